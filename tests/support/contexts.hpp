// SPDX-License-Identifier: Apache-2.0
#pragma once
// One test body, every execution context: a layer test written against a `context_fixture`
// runs on the host today and, once the CUDA backend adds its fixture (device copies of the
// views, downloads of the results), on the GPU too — without a second copy of the test.
//
//   test::for_each_context([&](auto& f) {
//     const auto x = f.to_context(L.xv());                  // a view in the context's memory
//     auto state = f.template make_state<Losses>(T, width, E);
//     layer.forward(f.context(), x, ...,  state.view(), ...);
//     const auto plan = state.download();                   // a host routing_plan to check
//   });
#include <boost/mp11/algorithm.hpp>
#include <boost/mp11/list.hpp>
#include <boost/test/unit_test.hpp>

#include <cstring>
#include <vector>

#include <switchyard/switchyard.hpp>

namespace switchyard::test {

template <class Context>
struct context_fixture;

//! The host: views are used in place, the state is a moe_result.
template <>
struct context_fixture<host_context> {
  static constexpr const char* name = "host";
  //! Whether this context can run here (a device context without a device: no; the test then
  //! reports the context as skipped).
  static bool available() { return true; }
  [[nodiscard]] host_context context() const { return {}; }

  //! A view of the same data in the context's memory (host: the view itself).
  template <class V>
  [[nodiscard]] V to_context(const V& host_view) const {
    return host_view;
  }
  //! Copies a result view from the context's memory back into host memory `dst` (same
  //! extents; host: a copy only when they are different arrays).
  template <class V, class U>
  void to_host(const V& ctx_view, U* dst) const {
    const std::size_t n = static_cast<std::size_t>(element_count(ctx_view));
    if (static_cast<const void*>(ctx_view.data_handle()) != static_cast<const void*>(dst) && n > 0) {
      std::memcpy(dst, ctx_view.data_handle(), n * sizeof(U));
    }
  }

  //! Forward state in the context's memory.
  template <class Losses>
  struct state_storage {
    moe_result<Losses> owner;
    [[nodiscard]] moe_state<Losses> view() { return owner.state(); }
    //! The state as host data (plan, losses, drops).
    [[nodiscard]] const moe_result<Losses>& download() const { return owner; }
  };
  template <class Losses>
  [[nodiscard]] state_storage<Losses> make_state(index_t tokens, index_t width,
                                                 index_t experts) const {
    state_storage<Losses> s;
    s.owner.resize(tokens, width, experts);
    return s;
  }
};

//! The contexts every layer test built on this header runs over (the CUDA backend appends
//! `cuda::context` where a .cu test includes its fixture).
using contexts = boost::mp11::mp_list<host_context>;

//! Runs `body(fixture)` for every context of `List` available here; the others are reported.
template <class List = contexts, class Body>
void for_each_context(Body&& body) {
  boost::mp11::mp_for_each<boost::mp11::mp_transform<boost::mp11::mp_identity, List>>(
      [&](auto id) {
        using C = typename decltype(id)::type;
        context_fixture<C> f;
        if (!f.available()) {
          BOOST_TEST_MESSAGE("context " << f.name << ": not available here, skipped");
          return;
        }
        BOOST_TEST_CONTEXT("context " << f.name) { body(f); }
      });
}

}  // namespace switchyard::test
