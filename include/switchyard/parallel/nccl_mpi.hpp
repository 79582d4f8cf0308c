// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file nccl_mpi.hpp
//! `parallel::nccl_mpi_group`: one NCCL rank per MPI process, bootstrapped over MPI (rank 0
//! makes an `ncclUniqueId`, MPI_Bcast hands it to every process, each calls
//! `ncclCommInitRank` on its device). Needs both NCCL (switchyard::nccl) and MPI
//! (switchyard::mpi); docs/communicators.md.
//!
//! ```cpp
//! MPI_Init(&argc, &argv);
//! {
//!   const sy::parallel::nccl_mpi_group group;        // MPI_COMM_WORLD, device = local rank % GPUs
//!   const sy::parallel::nccl_comm comm = group.comm();  // the Comm expert parallelism runs on
//!   ...
//! }  // the NCCL communicator is destroyed here, before MPI_Finalize
//! MPI_Finalize();
//! ```
//!
//! Without `<mpi.h>`, `<nccl.h>` or the CUDA runtime on the include path the header compiles
//! and declares an `nccl_mpi_group` whose use fails with a static_assert saying what to link.

#include "switchyard/parallel/mpi_comm.hpp"
#include "switchyard/parallel/nccl_comm.hpp"

#if !(__has_include(<mpi.h>) && __has_include(<nccl.h>) && __has_include(<cuda_runtime_api.h>))

namespace switchyard::parallel {

//! Stand-in declared when MPI, NCCL or the CUDA runtime is not reachable: constructing it
//! fails to compile.
class nccl_mpi_group {
 public:
  template <class... Args>
  explicit nccl_mpi_group(Args&&...) {
    static_assert(sizeof...(Args) > 1000,
                  "switchyard/parallel/nccl_mpi.hpp needs <mpi.h>, <nccl.h> and "
                  "<cuda_runtime_api.h>: link the CMake targets switchyard::nccl and "
                  "switchyard::mpi.");
  }
};

}  // namespace switchyard::parallel

#else

#include <mpi.h>

#include <cstring>

namespace switchyard::parallel {

//! Owns the NCCL communicator of this MPI process (one rank per process, the same rank and
//! size as on the MPI communicator), destroyed on destruction (before MPI_Finalize).
class nccl_mpi_group {
 public:
  //! Creates the communicator collectively over `comm` (every process calls it). `device`:
  //! this process's CUDA device; -1 (default) picks the node-local rank modulo the device count
  //! (MPI_Comm_split_type with MPI_COMM_TYPE_SHARED). Every process learns whether every
  //! other one found a device before NCCL starts (range_error naming `device` on every
  //! process otherwise, no hang).
  explicit nccl_mpi_group(MPI_Comm comm = MPI_COMM_WORLD, int device = -1) {
    const mpi_comm mpi(comm);
    int count = 0;
    const cudaError_t status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess) count = 0;
    if (device < 0 && count > 0) {
      MPI_Comm local = MPI_COMM_NULL;
      detail::mpi_check(
          MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, mpi.rank(), MPI_INFO_NULL, &local),
          "MPI_Comm_split_type");
      int local_rank = 0;
      const int rc = MPI_Comm_rank(local, &local_rank);
      MPI_Comm_free(&local);
      detail::mpi_check(rc, "MPI_Comm_rank");
      device = local_rank % count;
    }
    const bool ok = device >= 0 && device < count;
    if (!mpi.all_agree(ok)) {
      throw range_error(
          "device",
          ok ? switchyard::detail::concat("nccl_mpi_group (rank ", mpi.rank(),
                                          "): another rank has no usable CUDA device")
             : switchyard::detail::concat(
                   "nccl_mpi_group (rank ", mpi.rank(), "): device must be in [0, ", count,
                   "), got ", device, status != cudaSuccess ? " (cudaGetDeviceCount failed: " : "",
                   status != cudaSuccess ? cudaGetErrorName(status) : "",
                   status != cudaSuccess ? ")" : ""));
    }
    device_ = device;
    ncclUniqueId id{};
    if (mpi.rank() == 0) detail::nccl_check(ncclGetUniqueId(&id), "ncclGetUniqueId");
    detail::mpi_check(MPI_Bcast(&id, static_cast<int>(sizeof id), MPI_BYTE, 0, comm), "MPI_Bcast");
    const detail::nccl_device_scope scope(device_);
    detail::nccl_check(ncclCommInitRank(&comm_, mpi.size(), id, mpi.rank()), "ncclCommInitRank");
  }
  nccl_mpi_group(const nccl_mpi_group&) = delete;
  nccl_mpi_group& operator=(const nccl_mpi_group&) = delete;
  ~nccl_mpi_group() {
    if (comm_ != nullptr) (void)ncclCommDestroy(comm_);
  }

  //! This process's CUDA device.
  [[nodiscard]] int device() const noexcept { return device_; }
  //! The owned communicator.
  [[nodiscard]] ncclComm_t native() const noexcept { return comm_; }
  //! A `Comm` over it (valid while the group lives).
  [[nodiscard]] nccl_comm comm() const { return nccl_comm(comm_); }

 private:
  ncclComm_t comm_ = nullptr;
  int device_ = 0;
};

}  // namespace switchyard::parallel

#endif
