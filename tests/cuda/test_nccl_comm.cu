// SPDX-License-Identifier: Apache-2.0
// parallel::nccl_comm on a one-rank NCCL communicator of device 0 (nccl_local_group({0})):
// all_to_all (odd and zero sizes, and replayed from a captured CUDA graph), all_to_all_v (gaps
// between blocks, zero-size peers, null buffers when nothing moves), all_gather, all_agree,
// each against the bytes expected on the host (outputs poisoned first), and the argument
// errors (negative sizes, host memory, a wrong `out`). With two or more GPUs, the same over a
// group of two ranks driven by two threads. Skipped without a device (cuda_test_main.cu).
#include <boost/test/unit_test.hpp>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <random>
#include <thread>
#include <vector>

#include "support/random.hpp"
#include "switchyard/parallel/nccl_comm.hpp"

namespace sy = switchyard;
using sy::index_t;

namespace {

constexpr unsigned char poison = 0xA5;

void check_cuda(cudaError_t status, const char* what) {
  BOOST_REQUIRE_MESSAGE(status == cudaSuccess, what << ": " << cudaGetErrorString(status));
}

//! A device byte buffer (RAII), filled with the poison.
struct device_bytes {
  unsigned char* p = nullptr;
  std::size_t n = 0;
  explicit device_bytes(std::size_t size, int device = 0) : n(size) {
    check_cuda(cudaSetDevice(device), "cudaSetDevice");
    check_cuda(cudaMalloc(reinterpret_cast<void**>(&p), n == 0 ? 1 : n), "cudaMalloc");
    check_cuda(cudaMemset(p, poison, n == 0 ? 1 : n), "cudaMemset");
  }
  device_bytes(const device_bytes&) = delete;
  device_bytes& operator=(const device_bytes&) = delete;
  ~device_bytes() { (void)cudaFree(p); }
  void upload(const std::vector<unsigned char>& h) {
    check_cuda(cudaMemcpy(p, h.data(), h.size(), cudaMemcpyHostToDevice), "cudaMemcpy H2D");
  }
  [[nodiscard]] std::vector<unsigned char> download() const {
    std::vector<unsigned char> h(n);
    check_cuda(cudaMemcpy(h.data(), p, n, cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
    return h;
  }
};

//! n random bytes, never the poison.
std::vector<unsigned char> random_bytes(std::mt19937_64& g, std::size_t n) {
  std::vector<unsigned char> v(n);
  for (auto& b : v) {
    b = static_cast<unsigned char>(g() & 0xff);
    if (b == poison) b = 1;
  }
  return v;
}

}  // namespace

BOOST_AUTO_TEST_CASE(one_rank_properties) {
  static_assert(sy::parallel::Comm<sy::parallel::nccl_comm>);
  static_assert(sy::parallel::nccl_comm::space == sy::parallel::memory_space::device);
  const sy::parallel::nccl_local_group group({0});
  BOOST_TEST(group.size() == 1);
  const sy::parallel::nccl_comm comm = group.comm(0);
  BOOST_TEST(comm.rank() == 0);
  BOOST_TEST(comm.size() == 1);
  BOOST_TEST(comm.device() == 0);
  BOOST_TEST(comm.native() == group.native(0));
  BOOST_CHECK_THROW(sy::parallel::nccl_local_group({}), sy::range_error);
  BOOST_CHECK_THROW(sy::parallel::nccl_local_group({-1}), sy::range_error);
  BOOST_CHECK_THROW(sy::parallel::nccl_comm(nullptr), sy::comm_error);
}

BOOST_AUTO_TEST_CASE(all_gather_and_all_agree_on_host_values) {
  const sy::parallel::nccl_local_group group({0});
  const sy::parallel::nccl_comm comm = group.comm(0);
  std::vector<index_t> out(1, -1);
  const index_t value = (index_t{1} << 41) + 12345;  // index_t travels whole
  comm.all_gather(value, sy::span<index_t>(out.data(), out.size()));
  BOOST_TEST(out[0] == value);
  comm.all_gather(-7, sy::span<index_t>(out.data(), out.size()));
  BOOST_TEST(out[0] == -7);
  BOOST_TEST(comm.all_agree(true));
  BOOST_TEST(!comm.all_agree(false));
  BOOST_TEST(comm.all_agree(true));  // the vote cell does not keep an old "false"
  std::vector<index_t> two(2, -1);
  BOOST_CHECK_THROW(comm.all_gather(3, sy::span<index_t>(two.data(), two.size())), sy::shape_error);
  BOOST_TEST(comm.all_agree(true));  // still usable
}

BOOST_AUTO_TEST_CASE(all_to_all_moves_fixed_blocks) {
  const sy::parallel::nccl_local_group group({0});
  const sy::parallel::nccl_comm comm = group.comm(0);
  std::mt19937_64 g(sy::test::base_seed() + 1);
  cudaStream_t stream = nullptr;
  check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  for (index_t bytes : {index_t{13}, index_t{1}, index_t{4096 + 7}}) {
    const auto host = random_bytes(g, static_cast<std::size_t>(bytes));
    device_bytes send(host.size()), recv(host.size() + 1);
    send.upload(host);
    comm.all_to_all(send.p, recv.p, bytes, stream);
    check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    auto expected = host;
    expected.push_back(poison);  // nothing written past size()·bytes
    BOOST_TEST(recv.download() == expected, "bytes " << bytes);
  }
  // Zero bytes: nothing moves, null buffers allowed.
  comm.all_to_all(nullptr, nullptr, 0, stream);
  check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  check_cuda(cudaStreamDestroy(stream), "cudaStreamDestroy");
}

BOOST_AUTO_TEST_CASE(all_to_all_replays_from_a_cuda_graph) {
  const sy::parallel::nccl_local_group group({0});
  const sy::parallel::nccl_comm comm = group.comm(0);
  std::mt19937_64 g(sy::test::base_seed() + 2);
  cudaStream_t stream = nullptr;
  check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  const index_t bytes = 1031;
  device_bytes send(bytes), recv(bytes);
  // One exchange before the capture: NCCL connects peers on first use, which allocates.
  comm.all_to_all(send.p, recv.p, bytes, stream);
  check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  cudaGraph_t graph = nullptr;
  check_cuda(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "BeginCapture");
  comm.all_to_all(send.p, recv.p, bytes, stream);
  check_cuda(cudaStreamEndCapture(stream, &graph), "EndCapture");
  cudaGraphExec_t exec = nullptr;
  check_cuda(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
  for (int replay = 0; replay < 2; ++replay) {  // new data each replay: the graph reads it
    const auto host = random_bytes(g, bytes);
    send.upload(host);
    check_cuda(cudaMemset(recv.p, poison, bytes), "cudaMemset");
    check_cuda(cudaGraphLaunch(exec, stream), "cudaGraphLaunch");
    check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    BOOST_TEST(recv.download() == host, "replay " << replay);
  }
  check_cuda(cudaGraphExecDestroy(exec), "cudaGraphExecDestroy");
  check_cuda(cudaGraphDestroy(graph), "cudaGraphDestroy");
  check_cuda(cudaStreamDestroy(stream), "cudaStreamDestroy");
}

BOOST_AUTO_TEST_CASE(all_to_all_v_with_gaps_and_zero_sizes) {
  const sy::parallel::nccl_local_group group({0});
  const sy::parallel::nccl_comm comm = group.comm(0);
  std::mt19937_64 g(sy::test::base_seed() + 3);
  for (index_t bytes : {index_t{37}, index_t{1}, index_t{0}}) {
    const auto host = random_bytes(g, 64);
    device_bytes send(host.size()), recv(96);
    send.upload(host);
    const index_t send_bytes[1] = {bytes}, send_displs[1] = {5};
    const index_t recv_bytes[1] = {bytes}, recv_displs[1] = {11};
    comm.all_to_all_v(send.p, send_bytes, send_displs, recv.p, recv_bytes, recv_displs, nullptr);
    check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    std::vector<unsigned char> expected(96, poison);
    for (index_t i = 0; i < bytes; ++i) expected[11 + i] = host[5 + i];
    BOOST_TEST(recv.download() == expected, "bytes " << bytes);
  }
  const index_t zero[1] = {0};
  comm.all_to_all_v(nullptr, zero, zero, nullptr, zero, zero, nullptr);  // nothing moves
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

BOOST_AUTO_TEST_CASE(bad_arguments_are_typed_errors) {
  const sy::parallel::nccl_local_group group({0});
  const sy::parallel::nccl_comm comm = group.comm(0);
  device_bytes send(16), recv(16);
  std::vector<unsigned char> host(16, 1);
  BOOST_CHECK_THROW(comm.all_to_all(send.p, recv.p, -1, nullptr), sy::range_error);
  BOOST_CHECK_THROW(comm.all_to_all(host.data(), recv.p, 16, nullptr), sy::memory_space_error);
  BOOST_CHECK_THROW(comm.all_to_all(send.p, host.data(), 16, nullptr), sy::memory_space_error);
  BOOST_CHECK_THROW(comm.all_to_all(nullptr, recv.p, 16, nullptr), sy::null_pointer_error);
  const index_t ok[1] = {8}, negative[1] = {-2}, displ[1] = {0};
  BOOST_CHECK_THROW(comm.all_to_all_v(send.p, negative, displ, recv.p, ok, displ, nullptr),
                    sy::range_error);
  BOOST_CHECK_THROW(comm.all_to_all_v(send.p, ok, displ, host.data(), ok, displ, nullptr),
                    sy::memory_space_error);
  BOOST_CHECK_THROW(comm.all_to_all_v(send.p, nullptr, displ, recv.p, ok, displ, nullptr),
                    sy::null_pointer_error);
  try {
    comm.all_to_all(host.data(), recv.p, 16, nullptr);
  } catch (const sy::memory_space_error& e) {
    BOOST_TEST(e.argument() == "send");
    BOOST_TEST_MESSAGE(e.what());
  }
  // Nothing was enqueued by the failed calls: the communicator still works.
  send.upload(std::vector<unsigned char>(16, 9));
  comm.all_to_all(send.p, recv.p, 16, nullptr);
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  BOOST_TEST(recv.download() == std::vector<unsigned char>(16, 9));
}

BOOST_AUTO_TEST_CASE(two_ranks_on_two_devices_when_present) {
  int count = 0;
  check_cuda(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  if (count < 2) {
    BOOST_TEST_MESSAGE("one device: the two-rank case needs two (not run)");
    return;
  }
  const sy::parallel::nccl_local_group group({0, 1});
  constexpr index_t block = 29;
  std::vector<std::vector<unsigned char>> sent(2), received(2);
  std::mt19937_64 g(sy::test::base_seed() + 4);
  for (auto& s : sent) s = random_bytes(g, 2 * block);
  std::vector<std::thread> ranks;
  std::vector<int> failures(2, 0);
  for (int r = 0; r < 2; ++r) {
    // No Boost.Test assertion inside the threads (not thread-safe): count failures instead.
    ranks.emplace_back([&, r] {
      unsigned char* send = nullptr;
      unsigned char* recv = nullptr;
      try {
        const sy::parallel::nccl_comm comm = group.comm(r);
        std::vector<index_t> gathered(2, -1);
        comm.all_gather(100 + r, sy::span<index_t>(gathered.data(), 2));
        failures[r] += gathered != std::vector<index_t>{100, 101} ? 1 : 0;
        failures[r] += comm.all_agree(r == 0) ? 1 : 0;
        received[r].assign(2 * block, poison);
        bool ok =
            cudaSetDevice(r) == cudaSuccess &&
            cudaMalloc(reinterpret_cast<void**>(&send), 2 * block) == cudaSuccess &&
            cudaMalloc(reinterpret_cast<void**>(&recv), 2 * block) == cudaSuccess &&
            cudaMemcpy(send, sent[r].data(), 2 * block, cudaMemcpyHostToDevice) == cudaSuccess &&
            cudaMemset(recv, poison, 2 * block) == cudaSuccess;
        if (ok) {
          comm.all_to_all(send, recv, block, nullptr);
          ok = cudaDeviceSynchronize() == cudaSuccess &&
               cudaMemcpy(received[r].data(), recv, 2 * block, cudaMemcpyDeviceToHost) ==
                   cudaSuccess;
        }
        failures[r] += ok ? 0 : 10;
      } catch (...) {
        failures[r] += 100;
      }
      (void)cudaFree(send);
      (void)cudaFree(recv);
    });
  }
  for (auto& t : ranks) t.join();
  BOOST_TEST(failures == std::vector<int>(2, 0));
  for (int r = 0; r < 2; ++r) {
    for (int p = 0; p < 2; ++p) {
      for (index_t i = 0; i < block; ++i) {
        BOOST_TEST(received[r][p * block + i] == sent[p][r * block + i]);
      }
    }
  }
}
