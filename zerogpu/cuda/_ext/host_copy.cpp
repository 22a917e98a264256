#include "host_copy.h"

#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#include <xmmintrin.h>
#endif

namespace zerogpu {
namespace {

// Below this, memcpy through the caches is as fast and the data is likely reused.
constexpr size_t kStreamingFrom = size_t{1} << 20;
constexpr size_t kLine = 64;
// How far ahead of the copy the source is prefetched.
constexpr size_t kPrefetchAhead = 1024;

}  // namespace

void copy_streaming(void* dst, const void* src, size_t bytes) {
#if defined(__SSE2__)
  if (bytes >= kStreamingFrom) {
    auto* d = static_cast<char*>(dst);
    const auto* s = static_cast<const char*>(src);
    // Streaming stores need an aligned destination: copy up to the next line first.
    const size_t head = (kLine - reinterpret_cast<uintptr_t>(d) % kLine) % kLine;
    std::memcpy(d, s, head);
    d += head;
    s += head;
    bytes -= head;
    const char* const end = s + bytes / kLine * kLine;
    for (; s < end; s += kLine, d += kLine) {
      _mm_prefetch(s + kPrefetchAhead, _MM_HINT_NTA);
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 16));
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 32));
      const __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 48));
      _mm_stream_si128(reinterpret_cast<__m128i*>(d), a);
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + 16), b);
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + 32), c);
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + 48), e);
    }
    // Streaming stores are weakly ordered: make them visible before anyone is told the copy is done.
    _mm_sfence();
    std::memcpy(d, s, bytes % kLine);
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

}  // namespace zerogpu
