// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file aux_loss.hpp
//! Auxiliary-loss coefficients: set, parse and print them by name, and schedule their
//! strength over training steps. Works on any router's `losses_type` through its
//! `coefficient_fields()` (routing/loss_fields.hpp): only the fields backward reads as
//! coefficients are touched; diagnostics (Adaptive Gating's `top2_fraction`, ReMoE's counters
//! and sparsity) are copied unchanged.
//!
//!     auto c = training::parse_coefficients<routing::topp_losses>("lb_loss=0.01,z_loss=1e-3");
//!     training::aux_loss_schedule<routing::topp_losses> sched{.coefficients = c,
//!                                                             .warmup_steps = 100};
//!     layer.backward(ctx, x, rp, w, fwd, dy, sched.at(step), dx, grads, rgrads);
//!
//! Host only; nothing here allocates except the strings of describe_coefficients and errors.

#include <charconv>
#include <cmath>
#include <cstddef>
#include <locale>
#include <numbers>
#include <sstream>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>

#include "switchyard/core/config.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/routing/loss_fields.hpp"

namespace switchyard::detail {

//! Calls f(field) for each coefficient field of Losses, in declaration order.
template <class Losses, class F>
constexpr void for_each_coefficient_field(F&& f) {
  std::apply([&](const auto&... field) { (f(field), ...); }, Losses::coefficient_fields());
}

//! "a, b, c": the coefficient names of Losses ("(none)" when it has none).
template <class Losses>
std::string coefficient_names() {
  std::string out;
  for_each_coefficient_field<Losses>([&](const auto& field) {
    if (!out.empty()) out += ", ";
    out += field.name;
  });
  return out.empty() ? std::string("(none)") : out;
}

//! range_error naming `name` unless `value` is finite and >= 0.
inline void check_coefficient_value(std::string_view name, float value) {
  if (!std::isfinite(value) || value < 0.0f) {
    throw range_error(std::string(name),
                      detail::concat(name, ": a coefficient must be finite and >= 0, got ", value));
  }
}

//! The shortest text that reads back as exactly `v` ("0.01", "1e-08").
inline std::string coefficient_text(float v) {
  char buf[32];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

//! Reads `text` as a whole float in the classic "C" locale (whatever the global locale);
//! false when it is empty, has other characters after the number, or is out of float range.
inline bool parse_coefficient_text(std::string_view text, float& value) {
  if (text.empty()) return false;
  std::istringstream is{std::string(text)};
  is.imbue(std::locale::classic());
  float v = 0.0f;
  is >> v;
  if (is.fail()) return false;
  is.peek();  // at the end of the text: eof
  if (!is.eof()) return false;
  value = v;
  return true;
}

}  // namespace switchyard::detail

namespace switchyard::training {

//! A router losses struct with named coefficient fields (every router's `losses_type`).
template <class Losses>
concept coefficient_set = routing::has_coefficient_fields<Losses>;

//! `c` with every coefficient field multiplied by `s` (other fields copied). range_error
//! naming "s" unless s is finite and >= 0.
template <coefficient_set Losses>
[[nodiscard]] Losses scale_coefficients(Losses c, float s) {
  if (!std::isfinite(s) || s < 0.0f) {
    throw range_error("s", detail::concat("s: the scale must be finite and >= 0, got ", s));
  }
  detail::for_each_coefficient_field<Losses>([&](const auto& field) { field.of(c) *= s; });
  return c;
}

//! Sets the coefficient field called `name` to `value`. range_error naming `name` (and listing
//! the known names) when Losses has no such coefficient, or when value is negative or not
//! finite.
template <coefficient_set Losses>
void set_coefficient(Losses& c, std::string_view name, float value) {
  bool found = false;
  detail::for_each_coefficient_field<Losses>([&](const auto& field) {
    if (!found && name == std::string_view(field.name)) {
      detail::check_coefficient_value(name, value);
      field.of(c) = value;
      found = true;
    }
  });
  if (!found) {
    throw range_error(
        std::string(name),
        detail::concat("'", name, "' is not a coefficient of this router's losses; known: ",
                       detail::coefficient_names<Losses>()));
  }
}

//! The coefficient field called `name` (range_error naming `name` when unknown).
template <coefficient_set Losses>
[[nodiscard]] float get_coefficient(const Losses& c, std::string_view name) {
  float out = 0.0f;
  bool found = false;
  detail::for_each_coefficient_field<Losses>([&](const auto& field) {
    if (!found && name == std::string_view(field.name)) {
      out = field.of(c);
      found = true;
    }
  });
  if (!found) {
    throw range_error(
        std::string(name),
        detail::concat("'", name, "' is not a coefficient of this router's losses; known: ",
                       detail::coefficient_names<Losses>()));
  }
  return out;
}

//! `base` with the coefficients a spec sets: items `name=value` separated by commas and/or
//! blanks ("lb_loss=0.01,z_loss=1e-3", or describe_coefficients' "lb_loss=0.01 z_loss=0.001");
//! later items win; an empty spec returns base. Errors (range_error): an item without '=' or
//! with an empty name (argument "spec"), a value that is not a whole float number (argument
//! the name), an unknown name, a negative or non-finite value (set_coefficient). Each message
//! quotes the offending item.
template <coefficient_set Losses>
[[nodiscard]] Losses parse_coefficients(std::string_view spec, Losses base = {}) {
  std::size_t pos = 0;
  while (pos < spec.size()) {
    const auto end = spec.find_first_of(", \t\r\n", pos);
    const std::string_view item =
        spec.substr(pos, end == std::string_view::npos ? std::string_view::npos : end - pos);
    pos = end == std::string_view::npos ? spec.size() : end + 1;
    if (item.empty()) continue;
    const auto eq = item.find('=');
    if (eq == std::string_view::npos || eq == 0) {
      throw range_error("spec", detail::concat("spec: expected items name=value, got '", item,
                                               "' in '", spec, "'"));
    }
    const std::string_view name = item.substr(0, eq);
    const std::string_view text = item.substr(eq + 1);
    float value = 0.0f;
    if (!detail::parse_coefficient_text(text, value)) {
      throw range_error(std::string(name), detail::concat(name, ": expected a number, got '", text,
                                                          "' in item '", item, "'"));
    }
    set_coefficient(base, name, value);
  }
  return base;
}

//! "lb_loss=0.01 z_loss=0.001": every coefficient field, in declaration order, with the
//! shortest text that parses back to the same float (parse_coefficients reads it back).
//! Empty for a losses struct without coefficients.
template <coefficient_set Losses>
[[nodiscard]] std::string describe_coefficients(const Losses& c) {
  std::string out;
  detail::for_each_coefficient_field<Losses>([&](const auto& field) {
    if (!out.empty()) out += ' ';
    out += field.name;
    out += '=';
    out += detail::coefficient_text(field.of(c));
  });
  return out;
}

//! Range check of a whole coefficient set: range_error naming the field when one is negative
//! or not finite.
template <coefficient_set Losses>
void validate_coefficients(const Losses& c) {
  detail::for_each_coefficient_field<Losses>(
      [&](const auto& field) { detail::check_coefficient_value(field.name, field.of(c)); });
}

//! A coefficient set whose strength follows the step: `at(step)` = coefficients × scale(step).
//!
//! scale(step), step = 0, 1, 2, … (the optimizer steps taken so far; step 0 is the first):
//! - warmup: (step + 1) / warmup_steps for step < warmup_steps (1/W at step 0, 1 at step
//!   W − 1), then 1; warmup_steps = 0 means none;
//! - decay (when decay_start >= 0): from step decay_start on, cosine from 1 to final_scale
//!   over decay_steps steps, `final + (1 − final) · (1 + cos(π · u)) / 2` with
//!   u = min(step − decay_start, decay_steps) / decay_steps (1 at decay_start, final_scale from
//!   decay_start + decay_steps on); decay_steps = 0 jumps to final_scale at decay_start.
//! The two factors multiply where they overlap. Computed in double, returned as float.
template <coefficient_set Losses>
struct aux_loss_schedule {
  Losses coefficients{};     //!< full-strength coefficients (diagnostic fields copied as is)
  index_t warmup_steps = 0;  //!< >= 0; 0 = no warmup
  index_t decay_start = -1;  //!< -1 = no decay, else the first step of the decay (>= 0)
  index_t decay_steps = 0;   //!< >= 0: length of the cosine decay
  float final_scale = 1.0f;  //!< in [0, 1]: the scale after the decay

  //! range_error naming the field: a coefficient negative or not finite ("lb_loss", …),
  //! warmup_steps or decay_steps negative, decay_start < -1, final_scale outside [0, 1].
  void validate() const {
    validate_coefficients(coefficients);
    if (warmup_steps < 0) {
      throw range_error("warmup_steps",
                        detail::concat("warmup_steps must be >= 0, got ", warmup_steps));
    }
    if (decay_start < -1) {
      throw range_error(
          "decay_start",
          detail::concat("decay_start must be -1 (no decay) or >= 0, got ", decay_start));
    }
    if (decay_steps < 0) {
      throw range_error("decay_steps",
                        detail::concat("decay_steps must be >= 0, got ", decay_steps));
    }
    if (!(final_scale >= 0.0f && final_scale <= 1.0f)) {
      throw range_error("final_scale",
                        detail::concat("final_scale must be in [0, 1], got ", final_scale));
    }
  }

  //! The strength at `step` (>= 0, else range_error naming "step"); see the struct's comment.
  [[nodiscard]] float scale(index_t step) const {
    validate();
    if (step < 0) {
      throw range_error("step", detail::concat("step must be >= 0, got ", step));
    }
    double s = 1.0;
    if (step < warmup_steps) {
      s = static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
    }
    if (decay_start >= 0 && step >= decay_start) {
      const double fin = final_scale;
      double d = fin;
      if (decay_steps > 0) {
        const index_t into = step - decay_start < decay_steps ? step - decay_start : decay_steps;
        const double u = static_cast<double>(into) / static_cast<double>(decay_steps);
        d = fin + (1.0 - fin) * 0.5 * (1.0 + std::cos(std::numbers::pi * u));
      }
      s *= d;
    }
    return static_cast<float>(s);
  }

  //! `coefficients` with every coefficient field × scale(step); other fields copied.
  [[nodiscard]] Losses at(index_t step) const {
    return scale_coefficients(coefficients, scale(step));
  }
};

}  // namespace switchyard::training
