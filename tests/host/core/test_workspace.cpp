// Two-phase workspace: the planned size is exactly what carving needs; too small throws.
#include <boost/test/unit_test.hpp>

#include <switchyard/core/workspace.hpp>

#include <cstdint>
#include <memory>
#include <string>

namespace sy = switchyard;

BOOST_AUTO_TEST_CASE(planned_size_fits_the_carving) {
  sy::workspace_planner plan;
  plan.reserve<float>(1000);
  plan.reserve<std::int32_t>(3);
  plan.reserve<double>(0);
  BOOST_TEST(plan.bytes() == sy::align_workspace(4000) + sy::align_workspace(12));
  alignas(sy::workspace_alignment) static std::byte buf[8192];
  sy::workspace_arena arena(buf, plan.bytes());
  float* a = arena.take<float>(1000);
  std::int32_t* b = arena.take<std::int32_t>(3);
  BOOST_TEST(reinterpret_cast<std::uintptr_t>(b) % sy::workspace_alignment == 0u);
  BOOST_TEST(reinterpret_cast<std::byte*>(b) >= reinterpret_cast<std::byte*>(a + 1000));
  BOOST_TEST(arena.used() == plan.bytes());
  BOOST_CHECK_THROW(arena.take<float>(1), sy::range_error);
}

BOOST_AUTO_TEST_CASE(bad_workspace_is_rejected) {
  alignas(sy::workspace_alignment) static std::byte buf[1024];
  BOOST_CHECK_THROW(sy::workspace_arena(buf + 4, 512), sy::range_error);
  BOOST_CHECK_THROW(sy::workspace_arena(nullptr, 16), sy::null_pointer_error);
  sy::workspace_arena small(buf, 256);
  try {
    small.take<float>(100);
    BOOST_FAIL("expected range_error");
  } catch (const sy::range_error& e) {
    BOOST_TEST(e.argument() == "workspace");
    BOOST_TEST(std::string(e.what()).find("got 256") != std::string::npos, e.what());
  }
}
