// SPDX-License-Identifier: Apache-2.0
// parallel::nccl_mpi_group + nccl_comm: one NCCL rank per MPI process (the ncclUniqueId over
// MPI_Bcast), under mpiexec -n 2, 3, 4 (label mpi). Needs one GPU per rank: with fewer (NCCL
// refuses two ranks on one device), or none, every process exits 77 and CTest reports
// Skipped. Where it runs, the same seeded exchanges go through mpi_comm over host buffers and
// through nccl_comm over device buffers staged from them, and must give the same bytes.
// Built only when both MPI and NCCL are found; on CPU-only machines it proves that
// nccl_mpi.hpp compiles and links against both.
#include <boost/test/unit_test.hpp>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "support/random.hpp"
#include "switchyard/parallel/mpi_comm.hpp"
#include "switchyard/parallel/nccl_comm.hpp"
#include "switchyard/parallel/nccl_mpi.hpp"

namespace sy = switchyard;
using sy::index_t;

namespace {

bool init_suite() {
  return true;
}

constexpr unsigned char poison = 0xA5;

//! Bytes from rank `from` to rank `to` (some pairs empty), the same table on every rank.
index_t pair_bytes(int from, int to) {
  std::mt19937_64 g(sy::test::base_seed() + static_cast<unsigned>(from * 131 + to));
  return (from + 2 * to) % 3 == 0 ? 0 : static_cast<index_t>(g() % 200) + 1;
}

void require_cuda(cudaError_t status, const char* what) {
  BOOST_REQUIRE_MESSAGE(status == cudaSuccess, what << ": " << cudaGetErrorString(status));
}

}  // namespace

BOOST_AUTO_TEST_CASE(nccl_over_mpi_moves_the_same_bytes_as_mpi) {
  const sy::parallel::mpi_comm mpi;
  const sy::parallel::nccl_mpi_group group;
  const sy::parallel::nccl_comm nccl = group.comm();
  BOOST_TEST(nccl.rank() == mpi.rank());
  BOOST_TEST(nccl.size() == mpi.size());
  const int n = mpi.size(), me = mpi.rank();

  std::vector<index_t> gathered(static_cast<std::size_t>(n), -1);
  nccl.all_gather(1000 + me, sy::span<index_t>(gathered.data(), gathered.size()));
  for (int r = 0; r < n; ++r) BOOST_TEST(gathered[r] == 1000 + r);
  BOOST_TEST(!nccl.all_agree(me != n - 1));
  BOOST_TEST(nccl.all_agree(true));

  std::vector<index_t> sb(n), sd(n), rb(n), rd(n);
  index_t s_total = 0, r_total = 0;
  for (int p = 0; p < n; ++p) {
    sb[p] = pair_bytes(me, p);
    rb[p] = pair_bytes(p, me);
    sd[p] = s_total + 1;  // a gap of one byte before every block
    rd[p] = r_total + 2;
    s_total += sb[p] + 1;
    r_total += rb[p] + 2;
  }
  std::mt19937_64 g(sy::test::base_seed() * 7 + static_cast<unsigned>(me));
  std::vector<unsigned char> send(static_cast<std::size_t>(s_total) + 1);
  for (auto& b : send) b = static_cast<unsigned char>(1 + g() % 200);
  std::vector<unsigned char> via_mpi(static_cast<std::size_t>(r_total) + 1, poison);
  mpi.all_to_all_v(send.data(), sb.data(), sd.data(), via_mpi.data(), rb.data(), rd.data(),
                   nullptr);

  unsigned char* d_send = nullptr;
  unsigned char* d_recv = nullptr;
  require_cuda(cudaSetDevice(nccl.device()), "cudaSetDevice");
  require_cuda(cudaMalloc(reinterpret_cast<void**>(&d_send), send.size()), "cudaMalloc");
  require_cuda(cudaMalloc(reinterpret_cast<void**>(&d_recv), via_mpi.size()), "cudaMalloc");
  require_cuda(cudaMemcpy(d_send, send.data(), send.size(), cudaMemcpyHostToDevice), "H2D");
  require_cuda(cudaMemset(d_recv, poison, via_mpi.size()), "cudaMemset");
  nccl.all_to_all_v(d_send, sb.data(), sd.data(), d_recv, rb.data(), rd.data(), nullptr);
  require_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  std::vector<unsigned char> via_nccl(via_mpi.size());
  require_cuda(cudaMemcpy(via_nccl.data(), d_recv, via_nccl.size(), cudaMemcpyDeviceToHost), "D2H");
  BOOST_TEST(via_nccl == via_mpi, "rank " << me << ": NCCL and MPI received different bytes");
  (void)cudaFree(d_send);
  (void)cudaFree(d_recv);
}

//! MPI around Boost.Test; every process exits 77 (Skipped) unless each rank has its own GPU.
int main(int argc, char* argv[]) {
  MPI_Init(&argc, &argv);
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  int rank = 0, size = 1, devices = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (cudaGetDeviceCount(&devices) != cudaSuccess) devices = 0;
  int fewest = 0;
  MPI_Allreduce(&devices, &fewest, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (fewest < size) {  // a node-local check would be finer; the tests run on one node
    if (rank == 0) {
      std::printf("SKIPPED: %d ranks need %d CUDA devices, this machine has %d\n", size, size,
                  fewest);
    }
    MPI_Finalize();
    return 77;
  }
  const int rc = boost::unit_test::unit_test_main(&init_suite, argc, argv);
  MPI_Finalize();
  return rc;
}
