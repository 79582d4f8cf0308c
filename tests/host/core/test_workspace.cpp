// SPDX-License-Identifier: Apache-2.0
// Two-phase workspace: the measured size fits the carving from any start address; a span
// that is too small throws naming the sizes.
#include <boost/test/unit_test.hpp>

#include <switchyard/core/workspace.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace sy = switchyard;

namespace {
// The carving a policy would do: the same code for measuring and for carving.
template <class Arena>
std::vector<void*> carve(Arena& a) {
  return {a.template take<float>(1000), a.template take<std::int32_t>(3),
          a.template take<double>(0), a.template take<char>(17)};
}
}  // namespace

BOOST_AUTO_TEST_CASE(measured_size_fits_every_start_offset) {
  sy::workspace_arena measure;
  BOOST_TEST(!measure.carving());
  for (void* p : carve(measure)) BOOST_TEST(p == nullptr);
  const std::size_t need = measure.required();
  std::vector<std::byte> buf(need + 64);
  for (std::size_t offset = 0; offset < 64; offset += 7) {
    BOOST_TEST_CONTEXT("offset " << offset) {
      sy::workspace_arena arena({buf.data() + offset, need});
      const auto ptrs = carve(arena);
      for (void* p : ptrs) {
        BOOST_TEST(p != nullptr);
        BOOST_TEST(reinterpret_cast<std::uintptr_t>(p) % sy::workspace_arena::alignment == 0u);
      }
      // arrays do not overlap and stay inside the caller's span
      BOOST_TEST(static_cast<std::byte*>(ptrs[1]) >= static_cast<std::byte*>(ptrs[0]) + 4000);
      BOOST_TEST(static_cast<std::byte*>(ptrs[3]) + 17 <= buf.data() + offset + need);
    }
  }
}

BOOST_AUTO_TEST_CASE(too_small_or_null_workspace_is_rejected) {
  std::vector<std::byte> buf(256);
  sy::workspace_arena small({buf.data(), buf.size()});
  try {
    small.take<float>(100);
    BOOST_FAIL("expected shape_error");
  } catch (const sy::shape_error& e) {
    BOOST_TEST(e.argument() == "workspace");
    BOOST_TEST(std::string(e.what()).find("got 256") != std::string::npos, e.what());
  }
  BOOST_CHECK_THROW(sy::workspace_arena(::cuda::std::span<std::byte>(static_cast<std::byte*>(nullptr), 16)),
                    sy::null_pointer_error);
}
