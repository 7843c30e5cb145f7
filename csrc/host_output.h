// Output allocation for large CPU results, shared by the CPU kernels.
//
// Outputs of 32 MiB and more: glibc serves these with a fresh mmap on every call (32 MiB
// is its largest mmap threshold), so each 4 KiB page is faulted and zeroed while the GEMM
// writes it, which costs as much as the GEMM itself (docs/design.md, "Performance
// model"). Backing them with transparent huge pages (MADV_HUGEPAGE) cuts the page faults
// 512-fold. Smaller outputs, and every non-CPU output, come from the ordinary allocator.
// SALT_KERNELS_NO_HUGEPAGES=1 turns this off (e.g. to measure what it buys).
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace salt_kernels {

inline bool hugepage_outputs_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("SALT_KERNELS_NO_HUGEPAGES");
    return v == nullptr || v[0] == '\0' || v[0] == '0';
  }();
  return enabled;
}

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
#ifdef __linux__
  constexpr size_t kHugePageBytes = size_t{2} << 20, kMinBytes = size_t{32} << 20;
  if (options.device().is_cpu() && hugepage_outputs_enabled()) {
    int64_t numel = 1;
    for (auto s : sizes) numel *= s;
    const size_t bytes = static_cast<size_t>(numel) * at::elementSize(at::typeMetaToScalarType(options.dtype()));
    if (bytes >= kMinBytes) {
      const size_t padded = (bytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
      void* data = std::aligned_alloc(kHugePageBytes, padded);
      if (data != nullptr) {
        madvise(data, padded, MADV_HUGEPAGE);  // a hint: failure only costs speed
        return at::from_blob(data, sizes, [](void* p) { std::free(p); }, options);
      }
    }
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace salt_kernels
