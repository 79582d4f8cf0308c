// SPDX-License-Identifier: Apache-2.0
// The one Boost.Test main shared by the host test executables (linked dynamically).
#define BOOST_TEST_MODULE switchyard
#include <boost/test/unit_test.hpp>
