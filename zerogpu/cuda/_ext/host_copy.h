// Large host memory copies that bypass the CPU caches.
#pragma once

#include <cstddef>

namespace zerogpu {

// Copies like memcpy, with non-temporal stores for large copies. glibc's
// memcpy switches to such stores only above a threshold derived from the
// cache size (192 MiB on a machine reporting 256 MiB of shared cache), so a
// restore cut into smaller chunks would otherwise push every byte through
// the caches, at about half the speed, and evict everything else. Used for
// the emulated device's copies (a DMA engine's writes bypass the CPU caches
// too) and for filling the staging ring, which the DMA engine reads from memory.
void copy_streaming(void* dst, const void* src, size_t bytes);

}  // namespace zerogpu
