// The pages of outputs: large outputs are fresh mappings whose first stores would fault every
// page in; the kernels populate them first, a task its own range.
#pragma once
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace memkernels::cpu {

// A range from this size (64 pages) up is populated if it is fresh (populate_fresh_pages): the
// check, a system call, costs under 5% of a kernel's work on it.
constexpr int64_t kPopulateBytes = int64_t{256} << 10;

// Faults in the pages of [p, p + bytes) in one system call if they have never been written (the
// last one is not resident); true if it did. A large output is a fresh mapping (glibc maps 32 MB
// and more anew for each tensor, and torch's CPU allocator caches nothing), whose first stores
// would fault each 4 KB page in: a trap a page that costs more than the kernel's own work on it.
// MADV_POPULATE_WRITE (Linux 5.14) fills the pages as those faults would, zeroed, in one call;
// pages already there are left alone. Best effort: without it, the stores fault as usual.
inline bool populate_fresh_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_POPULATE_WRITE)
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~(page - 1);
  const uintptr_t last = (reinterpret_cast<uintptr_t>(p) + bytes - 1) & ~(page - 1);
  unsigned char resident = 0;
  if (bytes < kPopulateBytes || mincore(reinterpret_cast<void*>(last), page, &resident) != 0 || (resident & 1)) {
    return false;
  }
  return madvise(reinterpret_cast<void*>(first), last + page - first, MADV_POPULATE_WRITE) == 0;
#else
  return false;
#endif
}

}  // namespace memkernels::cpu
