// SPDX-License-Identifier: Apache-2.0
#pragma once
// The MPI test executables' setup: MPI_Init before the first test case, MPI_Finalize after the
// last (a Boost.Test global fixture), and the error handlers of MPI_COMM_WORLD and MPI_COMM_SELF
// set to MPI_ERRORS_RETURN so a failing call reaches mpi_comm's checks instead of aborting the job.
// CTest runs these executables under `mpiexec -n N` (tests/CMakeLists.txt, label mpi).
//
// A failed BOOST_REQUIRE on one rank leaves its peers waiting in their next collective: the
// tests use BOOST_CHECK wherever a rank can continue, and CTest's TIMEOUT ends a hang.

#include <mpi.h>

#include <boost/test/unit_test.hpp>

namespace switchyard::test {

struct mpi_global_fixture {
  mpi_global_fixture() {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (initialized == 0) MPI_Init(nullptr, nullptr);
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm_set_errhandler(MPI_COMM_SELF, MPI_ERRORS_RETURN);
  }
  ~mpi_global_fixture() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized == 0) MPI_Finalize();
  }
  mpi_global_fixture(const mpi_global_fixture&) = delete;
  mpi_global_fixture& operator=(const mpi_global_fixture&) = delete;
};

//! This process's rank in MPI_COMM_WORLD.
inline int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

//! The rank count of MPI_COMM_WORLD.
inline int world_size() {
  int n = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

}  // namespace switchyard::test
