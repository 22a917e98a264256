// The CPU-emulated driver: device memory is host memory, each stream is a
// worker thread with a FIFO queue, events are positions in that queue, async
// copies are memcpy done by the stream's thread, and an error is reported at
// the next synchronization, as CUDA reports asynchronous errors. Its functions
// have the driver's signatures and are exported as zgemu_<name>, so the
// engine loads them exactly as it loads libcuda.so.1.
#pragma once

#include <cstddef>
#include <cstdint>

#include "driver_api.h"

namespace zerogpu {
#define ZEROGPU_EXPORT_EMULATED(name, params) \
  extern "C" __attribute__((visibility("default"))) CUresult zgemu_##name params;
ZEROGPU_DRIVER_FUNCTIONS(ZEROGPU_EXPORT_EMULATED)
#undef ZEROGPU_EXPORT_EMULATED
}  // namespace zerogpu

namespace zerogpu::emulated {

// Faults injected for tests; a negative value leaves that fault off.
struct Faults {
  // Copies succeed for this many bytes in total, then every copy fails
  // (CUDA_ERROR_ILLEGAL_ADDRESS), reported where CUDA would report it.
  int64_t fail_after_bytes = -1;
  // Copies run for this many bytes in total, then stall until the fault is
  // cleared (or their stream is destroyed): a restore that never finishes.
  int64_t hang_after_bytes = -1;
  // This many allocations (device or pinned host) succeed, then each fails
  // with CUDA_ERROR_OUT_OF_MEMORY.
  int64_t fail_alloc = -1;
  // This many host registrations succeed, then each fails.
  int64_t fail_register = -1;
};

// Live objects of the emulated driver, so tests can assert nothing is leaked.
struct Resources {
  int64_t allocations = 0;
  int64_t host_allocations = 0;
  int64_t registrations = 0;
  int64_t streams = 0;
  int64_t events = 0;
  int64_t stream_threads = 0;
  int64_t allocated_bytes = 0;
  int64_t locked_bytes = 0;  // page-locked by pinned allocations and registrations
};

// Replaces the faults and restarts their byte and call counts; copies stalled
// by a hang fault resume once it is cleared.
void set_faults(const Faults& faults);
Faults faults();
Resources resources();
// How many devices the driver reports (each has the host's memory size).
void configure(int devices);

}  // namespace zerogpu::emulated
