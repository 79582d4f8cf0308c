// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file expert_parallel.hpp
//! `parallel::ExpertParallel<Comm, Capacity, Local>`: the dispatch policy that shards the E
//! FFN experts over the N ranks of a communicator (issue #16, docs/expert-parallel.md).
//!
//! Sharding: E must be a multiple of N; rank r owns the global experts [r·E/N, (r+1)·E/N)
//! and its `expert_weights` (and expert gradients) hold exactly those E/N experts, local
//! expert l being global expert r·E/N + l. The router's parameters are replicated: it scores
//! all E experts (plus the layer's identity / zero / constant experts, which never leave a
//! rank). `MoELayer` asks the policy for the global count (`global_experts`), so its
//! "weights.w1 extent 0" check reads E/N under expert parallelism and E otherwise.
//!
//! Capacity policies: `eager` (exact row counts exchanged, buffers sized from them, nothing
//! dropped) and `static_bound` (each (source, destination) pair of ranks carries at most
//! `peer_rows` rows in fixed blocks; the rest are dropped, counted per expert in the
//! forward's `dropped` like any capacity drop).
//!
//! Arguments are agreed before any exchange (`agree_on`): every rank runs the layer's shape
//! checks, the ranks gather an error code and the shapes the exchange depends on, and either
//! all proceed or all throw the same typed error. The execution lives in the backend
//! (`backend/host/expert_parallel.hpp`); this header includes none.

#include <array>
#include <cstdint>
#include <exception>
#include <string>
#include <type_traits>
#include <vector>

#include "switchyard/core/config.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/policy.hpp"
#include "switchyard/dispatch/concepts.hpp"
#include "switchyard/dispatch/groups.hpp"
#include "switchyard/dispatch/padded_capacity.hpp"
#include "switchyard/dispatch/sorted_grouped.hpp"
#include "switchyard/parallel/comm.hpp"

namespace switchyard::detail {

//! Error codes `agree_on` gathers: which typed error a rank's check threw.
enum class ep_check_error : index_t {
  none = 0, shape, range, non_finite, null_pointer, memory_space, unsupported, invalid, other
};

//! The code of the exception in flight (call inside a catch block).
inline ep_check_error ep_classify(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const shape_error&) {
    return ep_check_error::shape;
  } catch (const range_error&) {
    return ep_check_error::range;
  } catch (const non_finite_error&) {
    return ep_check_error::non_finite;
  } catch (const null_pointer_error&) {
    return ep_check_error::null_pointer;
  } catch (const memory_space_error&) {
    return ep_check_error::memory_space;
  } catch (const unsupported_error&) {
    return ep_check_error::unsupported;
  } catch (const switchyard::invalid_argument&) {
    return ep_check_error::invalid;
  } catch (...) {
    return ep_check_error::other;
  }
}

//! Throws, on a rank whose own check passed, the error type rank `rank` threw (code `code`).
[[noreturn]] inline void ep_throw_peer_error(ep_check_error code, index_t rank) {
  const std::string arg = detail::concat("rank ", rank);
  const std::string msg = detail::concat(
      "switchyard: ExpertParallel: rank ", rank,
      " rejected its arguments (its own exception names them); every rank throws this error "
      "type and none exchanges");
  switch (code) {
    case ep_check_error::shape: throw shape_error(arg, msg);
    case ep_check_error::range: throw range_error(arg, msg);
    case ep_check_error::non_finite: throw non_finite_error(arg, msg);
    case ep_check_error::null_pointer: throw null_pointer_error(arg, msg);
    case ep_check_error::memory_space: throw memory_space_error(arg, msg);
    case ep_check_error::unsupported: throw unsupported_error(msg);
    case ep_check_error::invalid: throw switchyard::invalid_argument(arg, msg);
    default: throw comm_error(0, msg);
  }
}

}  // namespace switchyard::detail

namespace switchyard::parallel {

//! Capacity policy: the exact per-(rank, expert) row counts are exchanged first and the
//! receive buffers sized from them; no row is dropped or padded.
struct eager {
  //! No hyperparameters.
  void validate() const {}
};

//! Capacity policy: a fixed receive bound. Each source rank sends every destination rank at
//! most `peer_rows` rows (a rank receives at most N·peer_rows rows), in fixed blocks of
//! peer_rows rows: the buffers' sizes depend on the bound alone. For each destination, the
//! sender's pairs claim its peer_rows rows in (token, slot) order; the pairs past the bound
//! are dropped (they contribute nothing, d_weights 0) and counted per global expert in
//! `state.dropped` / the `dropped` span of the rank that owns the token.
struct static_bound {
  index_t peer_rows = 0;  //!< rows per (source, destination) pair, >= 0

  //! range_error unless peer_rows >= 0.
  void validate() const {
    if (peer_rows < 0) {
      throw range_error("dispatch.capacity.peer_rows",
                        detail::concat("dispatch.capacity.peer_rows: must be >= 0, got ",
                                       peer_rows));
    }
  }
};

//! What the layer's shape check returns for the ranks to agree on: the router's expert count
//! (FFN + non-FFN), the model width d, the expert hidden width and the FFN expert count.
using agreed_shapes = std::array<index_t, 4>;


//! Expert parallelism over `C`'s ranks, `Local` the dispatch each rank runs over the rows it
//! receives (docs/expert-parallel.md):
//! - `sorted_grouped` (the default): its GEMMs see, per expert, exactly the rows the
//!   single-process layer would, hence the same bits; nothing is dropped locally.
//! - `padded_capacity` (with `static_bound` only): each local expert keeps the first C rows it
//!   receives, in receive order (source rank, then the sender's (token, slot) order: the
//!   concatenated batch's token order), in blocks of a size fixed on the host, so no step of a
//!   forward or backward waits for the device (CUDA-graph capturable with a caller workspace).
//!   The receiver returns each row's verdict; the token's rank marks the pairs its peers
//!   dropped and counts them in `dropped` with the bound's own drops. `local.drop` applies to
//!   every dropped pair (zero, or w_tj · x_t under scaled_input). With an absolute
//!   `expert_capacity` and a bound nobody reaches this is the single-process padded_capacity
//!   layer on the concatenated batch.
template <Comm C, class Capacity = eager, class Local = dispatch::sorted_grouped>
struct ExpertParallel {
  static_assert(std::is_same_v<Capacity, eager> || std::is_same_v<Capacity, static_bound>,
                "switchyard: ExpertParallel's Capacity must be parallel::eager or "
                "parallel::static_bound");
  static_assert(std::is_same_v<Local, dispatch::sorted_grouped> ||
                    (std::is_same_v<Local, dispatch::padded_capacity> &&
                     std::is_same_v<Capacity, static_bound>),
                "switchyard: ExpertParallel's Local must be dispatch::sorted_grouped, or "
                "dispatch::padded_capacity with parallel::static_bound (the fixed-size, "
                "CUDA-graph capturable combination; docs/expert-parallel.md)");

  using policy_kind = dispatch_tag;
  using comm_type = C;             //!< the communication engine
  using capacity_type = Capacity;  //!< eager or static_bound
  using local_type = Local;        //!< the dispatch run over the received rows
  //! The rows each rank's experts see are grouped like the local dispatch's.
  static constexpr dispatch::dispatch_layout layout = Local::layout;
  //! Marks a policy whose experts are sharded over ranks (the layer and backends test it).
  static constexpr bool expert_parallel = true;

  const C* comm = nullptr;  //!< the communicator (not owned; outlives every call)
  Capacity capacity{};      //!< eager or static_bound
  Local local{};            //!< the dispatch over the received rows

  //! null_pointer_error for a null comm; the capacity's and the local dispatch's checks.
  void validate() const {
    require_comm();
    capacity.validate();
    local.validate();
  }

  //! The local dispatch's bound (the exchange's buffers are sized by the backend).
  [[nodiscard]] SWITCHYARD_HD index_t max_rows(index_t tokens, index_t width,
                                               index_t experts) const {
    return local.max_rows(tokens, width, experts);
  }

  //! The rank count N (null_pointer_error without a communicator).
  [[nodiscard]] index_t ranks() const {
    require_comm();
    return static_cast<index_t>(comm->size());
  }

  //! The global FFN expert count E of ranks whose shards hold `local_experts` = E/N each.
  [[nodiscard]] index_t global_experts(index_t local_experts) const {
    return local_experts * ranks();
  }

  //! Runs `check` (the layer's shape checks, returning `agreed_shapes`) and agrees on its
  //! outcome over every rank before anything is exchanged: when a rank's check throws, that
  //! rank rethrows its exception and every other rank throws the same error type naming it;
  //! when the ranks' shapes differ (E, d, d_ff or the FFN expert count), every rank throws
  //! shape_error naming the first difference; under static_bound, when their peer_rows differ,
  //! every rank throws range_error naming dispatch.capacity.peer_rows. `all_gather`s only.
  template <class F>
  agreed_shapes agree_on(const F& check) const {
    require_comm();
    const std::size_t n = static_cast<std::size_t>(comm->size());
    agreed_shapes shapes{};
    std::exception_ptr error;
    detail::ep_check_error code = detail::ep_check_error::none;
    try {
      shapes = check();
    } catch (...) {
      error = std::current_exception();
      code = detail::ep_classify(error);
    }
    std::vector<index_t> all(n);
    comm->all_gather(static_cast<index_t>(code), span<index_t>(all.data(), n));
    for (std::size_t r = 0; r < n; ++r) {
      if (all[r] == 0) continue;
      if (error) std::rethrow_exception(error);
      detail::ep_throw_peer_error(static_cast<detail::ep_check_error>(all[r]), static_cast<index_t>(r));
    }
    // Every check passed: the shapes the exchange depends on must agree (one all_gather
    // each, so the message can name the value that differs).
    static constexpr const char* names[4] = {"the router's expert count", "d (x.extent(1))",
                                              "d_ff (weights.w2.extent(2))",
                                              "the FFN expert count E"};
    for (std::size_t k = 0; k < shapes.size(); ++k) {
      comm->all_gather(shapes[k], span<index_t>(all.data(), n));
      for (std::size_t r = 1; r < n; ++r) {
        if (all[r] != all[0]) {
          throw shape_error("weights.w1", detail::concat(
                                              "switchyard: ExpertParallel: the ranks disagree on ",
                                              names[k], ": rank 0 has ", all[0], ", rank ", r,
                                              " has ", all[r], " (every rank must hold the same "
                                              "router and E/N experts of the same shape)"));
        }
      }
    }
    // static_bound's blocks must have one size on every rank (the exchanges are all_to_alls
    // of peer_rows rows per peer: a rank with another bound would send blocks its peers do not
    // expect).
    if constexpr (std::is_same_v<Capacity, static_bound>) {
      comm->all_gather(capacity.peer_rows, span<index_t>(all.data(), n));
      for (std::size_t r = 1; r < n; ++r) {
        if (all[r] != all[0]) {
          throw range_error("dispatch.capacity.peer_rows",
                            detail::concat("dispatch.capacity.peer_rows: the ranks disagree: "
                                           "rank 0 has ", all[0], ", rank ", r, " has ", all[r],
                                           " (every rank must use the same static_bound)"));
        }
      }
    }
    return shapes;
  }

 private:
  void require_comm() const {
    if (comm == nullptr) {
      throw null_pointer_error("dispatch.comm",
                               "dispatch.comm: ExpertParallel needs a communicator, got null");
    }
  }
};

//! True for `ExpertParallel<...>` (and any dispatch declaring `expert_parallel = true`).
template <class D>
inline constexpr bool is_expert_parallel = requires { requires D::expert_parallel; };

}  // namespace switchyard::parallel
