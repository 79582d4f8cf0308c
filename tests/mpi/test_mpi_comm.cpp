// SPDX-License-Identifier: Apache-2.0
// parallel::mpi_comm under mpiexec -n 2, 3, 4 (CTest label mpi): every operation against the
// bytes every rank can predict (odd sizes, zero-byte peers, a rank that sends nothing, a rank
// that receives nothing, displacements with gaps and in reverse order, untouched gaps), and
// bad arguments on one rank making every rank throw the same typed error, after which the
// communicator still works (no rank hangs, nothing left half-exchanged).
#include <boost/test/unit_test.hpp>

#include <climits>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "mpi/mpi_fixture.hpp"
#include "support/random.hpp"
#include "switchyard/parallel/mpi_comm.hpp"

namespace sy = switchyard;
using sy::index_t;

using mpi_fixture = switchyard::test::mpi_global_fixture;
BOOST_TEST_GLOBAL_FIXTURE(mpi_fixture);

namespace {

constexpr unsigned char poison = 0xA5;

//! Byte i of the message from rank `from` to rank `to` in round `round`: never the poison, and
//! different for every (round, from, to, i), so a block landing in the wrong place is seen.
unsigned char payload(std::uint64_t round, int from, int to, index_t i) {
  std::uint64_t h = (round * 0x9E3779B97F4A7C15ull) ^ (static_cast<std::uint64_t>(from) << 40) ^
                    (static_cast<std::uint64_t>(to) << 20) ^ static_cast<std::uint64_t>(i);
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  auto b = static_cast<unsigned char>(h & 0xff);
  return b == poison ? static_cast<unsigned char>(b + 1) : b;
}

//! Bytes rank `from` sends to rank `to` in round `round` of the v-exchange: seeded, odd sizes,
//! zeros where the round asks for them. Every rank computes the same table.
index_t message_bytes(std::uint64_t round, int from, int to, int n) {
  std::mt19937_64 g(sy::test::base_seed() + round * 1000003u +
                    static_cast<unsigned>(from * 97 + to));
  const index_t b = static_cast<index_t>(g() % 37) * 2 + 1;  // odd, 1 ... 73
  switch (round % 4) {
    case 1:  // the last rank sends nothing
      return from == n - 1 ? 0 : b;
    case 2:  // rank 0 receives nothing, and every other pair with from + to even is empty
      return to == 0 || (from + to) % 2 == 0 ? 0 : b;
    case 3:  // everything is empty but the messages to the last rank
      return to == n - 1 ? b : 0;
    default:
      return b;
  }
}

struct layout {
  std::vector<index_t> bytes, displs;
  index_t extent = 0;
};

//! Displacements with a gap of 3 bytes before every block, the blocks in reverse peer order
//! when `reverse` (MPI must honour the displacements, not assume packing).
layout lay_out(const std::vector<index_t>& bytes, bool reverse) {
  layout l{bytes, std::vector<index_t>(bytes.size()), 0};
  const auto n = static_cast<int>(bytes.size());
  for (int k = 0; k < n; ++k) {
    const int p = reverse ? n - 1 - k : k;
    l.extent += 3;
    l.displs[p] = l.extent;
    l.extent += bytes[p];
  }
  l.extent += 3;
  return l;
}

void exchange_round(const sy::parallel::mpi_comm& comm, std::uint64_t round) {
  const int n = comm.size();
  const int me = comm.rank();
  std::vector<index_t> sb(n), rb(n);
  for (int p = 0; p < n; ++p) {
    sb[p] = message_bytes(round, me, p, n);
    rb[p] = message_bytes(round, p, me, n);
  }
  const layout sl = lay_out(sb, round % 2 == 1);
  const layout rl = lay_out(rb, round % 3 == 1);
  std::vector<unsigned char> send(static_cast<std::size_t>(sl.extent), poison);
  for (int p = 0; p < n; ++p) {
    for (index_t i = 0; i < sb[p]; ++i) send[sl.displs[p] + i] = payload(round, me, p, i);
  }
  std::vector<unsigned char> recv(static_cast<std::size_t>(rl.extent), poison);
  comm.all_to_all_v(send.data(), sb.data(), sl.displs.data(), recv.data(), rb.data(),
                    rl.displs.data(), nullptr);
  std::vector<unsigned char> expected(recv.size(), poison);
  for (int p = 0; p < n; ++p) {
    for (index_t i = 0; i < rb[p]; ++i) expected[rl.displs[p] + i] = payload(round, p, me, i);
  }
  index_t wrong = 0;
  for (std::size_t i = 0; i < recv.size(); ++i) wrong += recv[i] != expected[i] ? 1 : 0;
  BOOST_TEST(wrong == 0, "round " << round << ", rank " << me << ": " << wrong << " of "
                                  << recv.size() << " bytes differ (gaps must stay poisoned)");
}

//! Runs `body` on every rank, expects every rank to throw `Error` naming `argument`, and then
//! checks that the communicator still exchanges correctly.
template <class Error, class Body>
void expect_agreed_error(const sy::parallel::mpi_comm& comm, const std::string& argument,
                         Body body) {
  bool threw = false;
  try {
    body();
  } catch (const Error& e) {
    threw = true;
    if constexpr (std::is_base_of_v<sy::invalid_argument, Error>) {
      BOOST_TEST(e.argument() == argument, "rank " << comm.rank() << ": " << e.what());
    }
    BOOST_TEST_MESSAGE("rank " << comm.rank() << ": " << e.what());
  }
  BOOST_TEST(threw, "rank " << comm.rank() << " did not throw the expected error");
  BOOST_TEST(comm.all_agree(threw));
  exchange_round(comm, 7);  // still in step with the peers
}

}  // namespace

BOOST_AUTO_TEST_CASE(rank_and_size_match_mpi) {
  const sy::parallel::mpi_comm comm;
  static_assert(sy::parallel::Comm<sy::parallel::mpi_comm>);
  static_assert(sy::parallel::mpi_comm::space == sy::parallel::memory_space::host);
  BOOST_TEST(comm.rank() == sy::test::world_rank());
  BOOST_TEST(comm.size() == sy::test::world_size());
  BOOST_TEST(comm.native() == MPI_COMM_WORLD);
  const sy::parallel::mpi_comm self(MPI_COMM_SELF);
  BOOST_TEST(self.size() == 1);
  BOOST_TEST(self.rank() == 0);
}

BOOST_AUTO_TEST_CASE(all_gather_collects_every_rank_value) {
  const sy::parallel::mpi_comm comm;
  const int n = comm.size();
  // Negative, above INT_MAX and ordinary values: index_t travels whole.
  auto value = [](int r) -> index_t {
    return r % 3 == 0 ? -(r + 5) : (r % 3 == 1 ? (index_t{1} << 40) + r : 1000 + 17 * r);
  };
  std::vector<index_t> out(n, -777);
  comm.all_gather(value(comm.rank()), sy::span<index_t>(out.data(), out.size()));
  for (int r = 0; r < n; ++r)
    BOOST_TEST(out[r] == value(r), "rank " << comm.rank() << " entry " << r);
}

BOOST_AUTO_TEST_CASE(all_agree_is_a_logical_and) {
  const sy::parallel::mpi_comm comm;
  const int n = comm.size();
  BOOST_TEST(comm.all_agree(true));
  for (int r = 0; r < n; ++r)
    BOOST_TEST(!comm.all_agree(comm.rank() != r), "rank " << r << " says no");
  BOOST_TEST(!comm.all_agree(false));
}

BOOST_AUTO_TEST_CASE(all_to_all_moves_fixed_blocks) {
  const sy::parallel::mpi_comm comm;
  const int n = comm.size();
  const int me = comm.rank();
  for (index_t bytes : {index_t{13}, index_t{1}, index_t{0}, index_t{4096 + 5}}) {
    std::vector<unsigned char> send(static_cast<std::size_t>(bytes * n) + 1, poison);
    for (int p = 0; p < n; ++p) {
      for (index_t i = 0; i < bytes; ++i) send[p * bytes + i] = payload(100 + bytes, me, p, i);
    }
    std::vector<unsigned char> recv(send.size(), poison);
    comm.all_to_all(send.data(), recv.data(), bytes, nullptr);
    index_t wrong = 0;
    for (int p = 0; p < n; ++p) {
      for (index_t i = 0; i < bytes; ++i)
        wrong += recv[p * bytes + i] != payload(100 + bytes, p, me, i);
    }
    wrong += recv.back() != poison;  // nothing written past n·bytes
    BOOST_TEST(wrong == 0, "bytes " << bytes << ", rank " << me);
  }
}

BOOST_AUTO_TEST_CASE(all_to_all_v_odd_sizes_empty_peers_and_gaps) {
  const sy::parallel::mpi_comm comm;
  for (std::uint64_t round = 0; round < 8; ++round) exchange_round(comm, round);
}

BOOST_AUTO_TEST_CASE(all_to_all_v_with_every_size_zero_and_null_buffers) {
  const sy::parallel::mpi_comm comm;
  const std::vector<index_t> zeros(static_cast<std::size_t>(comm.size()), 0);
  comm.all_to_all_v(nullptr, zeros.data(), zeros.data(), nullptr, zeros.data(), zeros.data(),
                    nullptr);
  exchange_round(comm, 9);
}

BOOST_AUTO_TEST_CASE(all_to_all_v_runs_on_a_split_communicator) {
  const sy::parallel::mpi_comm world;
  MPI_Comm half = MPI_COMM_NULL;
  MPI_Comm_split(MPI_COMM_WORLD, world.rank() % 2, world.rank(), &half);
  MPI_Comm_set_errhandler(half, MPI_ERRORS_RETURN);
  {
    const sy::parallel::mpi_comm comm(half);
    BOOST_TEST(comm.size() == (world.size() + 1 - world.rank() % 2) / 2);
    BOOST_TEST(comm.rank() == world.rank() / 2);
    for (std::uint64_t round = 10; round < 14; ++round) exchange_round(comm, round);
  }
  MPI_Comm_free(&half);
}

// ---- bad arguments on one rank: every rank throws the same typed error --------------------

BOOST_AUTO_TEST_CASE(negative_send_size_on_the_last_rank_fails_everywhere) {
  const sy::parallel::mpi_comm comm;
  const int n = comm.size();
  std::vector<index_t> sb(n, 2), rb(n, 2), sd(n), rd(n);
  for (int p = 0; p < n; ++p) sd[p] = rd[p] = 2 * p;
  if (comm.rank() == n - 1) sb[0] = -3;
  std::vector<unsigned char> send(2 * n, 1), recv(2 * n, poison);
  expect_agreed_error<sy::range_error>(comm, "send_bytes", [&] {
    comm.all_to_all_v(send.data(), sb.data(), sd.data(), recv.data(), rb.data(), rd.data(),
                      nullptr);
  });
  BOOST_TEST(recv == std::vector<unsigned char>(2 * n, poison));  // nothing moved
}

BOOST_AUTO_TEST_CASE(sizes_above_int_max_are_a_range_error_everywhere) {
  const sy::parallel::mpi_comm comm;
  const int n = comm.size();
  std::vector<index_t> sb(n, 0), rb(n, 0), sd(n, 0), rd(n, 0);
  if (comm.rank() == 0) rd[n - 1] = index_t{INT_MAX} + 1;
  unsigned char byte = 1;
  expect_agreed_error<sy::range_error>(comm, "recv_displs", [&] {
    comm.all_to_all_v(&byte, sb.data(), sd.data(), &byte, rb.data(), rd.data(), nullptr);
  });
}

BOOST_AUTO_TEST_CASE(receive_size_disagreeing_with_the_sender_fails_everywhere) {
  const sy::parallel::mpi_comm comm;
  const int n = comm.size();
  std::vector<index_t> sb(n, 3), rb(n, 3), sd(n), rd(n);
  for (int p = 0; p < n; ++p) sd[p] = rd[p] = 4 * p;
  if (comm.rank() == n / 2) rb[n - 1] = 4;  // expects one byte more than rank n-1 sends
  std::vector<unsigned char> send(4 * n, 1), recv(4 * n, poison);
  expect_agreed_error<sy::shape_error>(comm, "recv_bytes", [&] {
    comm.all_to_all_v(send.data(), sb.data(), sd.data(), recv.data(), rb.data(), rd.data(),
                      nullptr);
  });
}

BOOST_AUTO_TEST_CASE(null_send_buffer_with_bytes_fails_everywhere) {
  const sy::parallel::mpi_comm comm;
  const int n = comm.size();
  std::vector<index_t> sb(n, 1), rb(n, 1), sd(n), rd(n);
  std::iota(sd.begin(), sd.end(), index_t{0});
  std::iota(rd.begin(), rd.end(), index_t{0});
  std::vector<unsigned char> send(n, 1), recv(n, poison);
  const bool culprit = comm.rank() == 0;
  expect_agreed_error<sy::null_pointer_error>(comm, "send", [&] {
    comm.all_to_all_v(culprit ? nullptr : send.data(), sb.data(), sd.data(), recv.data(), rb.data(),
                      rd.data(), nullptr);
  });
}

BOOST_AUTO_TEST_CASE(all_gather_with_a_wrong_out_size_fails_everywhere) {
  const sy::parallel::mpi_comm comm;
  const int n = comm.size();
  std::vector<index_t> out(n + 1, -1);
  const std::size_t size = comm.rank() == n - 1 ? out.size() : static_cast<std::size_t>(n);
  expect_agreed_error<sy::shape_error>(
      comm, "out", [&] { comm.all_gather(comm.rank(), sy::span<index_t>(out.data(), size)); });
}

BOOST_AUTO_TEST_CASE(all_to_all_with_disagreeing_sizes_fails_everywhere) {
  const sy::parallel::mpi_comm comm;
  const int n = comm.size();
  const index_t bytes = comm.rank() == 0 ? 5 : 4;
  std::vector<unsigned char> send(5 * n, 1), recv(5 * n, poison);
  expect_agreed_error<sy::shape_error>(
      comm, "bytes", [&] { comm.all_to_all(send.data(), recv.data(), bytes, nullptr); });
  expect_agreed_error<sy::range_error>(comm, "bytes", [&] {
    comm.all_to_all(send.data(), recv.data(), comm.rank() == n - 1 ? -1 : 4, nullptr);
  });
}

BOOST_AUTO_TEST_CASE(an_mpi_failure_is_a_comm_error) {
  // MPI_ERRORS_RETURN (the fixture's) lets the failing call's code reach mpi_check.
  BOOST_CHECK_THROW(sy::detail::mpi_check(MPI_ERR_COUNT, "MPI_Test"), sy::comm_error);
  try {
    sy::detail::mpi_check(MPI_ERR_COUNT, "MPI_Test");
  } catch (const sy::comm_error& e) {
    BOOST_TEST(e.code() == MPI_ERR_COUNT);
    BOOST_TEST(std::string(e.what()).find("MPI_Test") != std::string::npos);
  }
  BOOST_CHECK_THROW(sy::parallel::mpi_comm(MPI_COMM_NULL), sy::comm_error);
}
