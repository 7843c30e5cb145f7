// Argument checks shared by the ops of salt_linear.cpp and salt_multi.cpp.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <utility>

namespace salt_kernels {

// Every tensor argument must be on the first one's device: a kernel reading another
// device's pointers would read foreign memory (or crash). Null / undefined: skipped.
inline void check_one_device(const char* op,
                             std::initializer_list<std::pair<const char*, const at::Tensor*>> args) {
  const auto& [first_name, first] = *args.begin();
  for (const auto& [name, t] : args) {
    if (t == nullptr || !t->defined()) continue;
    TORCH_CHECK(t->device() == first->device(), "salt_kernels.", op, ": ", name, " is on ", t->device(), " but ",
                first_name, " is on ", first->device(), "; all tensor arguments must be on one device");
  }
}

}  // namespace salt_kernels
