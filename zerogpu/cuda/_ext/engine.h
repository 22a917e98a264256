// The copy engine: one bulk host-to-device copy of a contiguous region,
// cut into chunks and pipelined by one of three strategies.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "driver.h"
#include "memory.h"

namespace zerogpu {

class FirstFailure;

enum class Strategy {
  // Synchronous cuMemcpyHtoD_v2 of each chunk straight from pageable memory.
  pageable,
  // Page-lock each chunk in place (cuMemHostRegister_v2) and copy it
  // asynchronously; registering the next chunks overlaps the copies.
  registered,
  // Worker threads memcpy chunks into a pinned ring while the DMA engine
  // drains the slots filled before.
  staging,
};

struct RestoreOptions {
  Strategy strategy = Strategy::pageable;
  size_t chunk_bytes = size_t{64} << 20;
  int streams = 1;
  int threads = 1;
};

struct RestoreReport {
  double seconds = 0;
  // Spent in cuMemHostRegister_v2 and cuMemHostUnregister, summed over threads.
  double register_seconds = 0;
  // Spent creating streams or the staging ring in this call (0 when reused).
  double setup_seconds = 0;
};

// One per process and device. It owns its streams and the staging ring; a
// restore's worker threads, events and registrations live only for that call.
class Engine {
 public:
  explicit Engine(std::shared_ptr<DeviceContext> device);
  ~Engine() { close(); }
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Copies `nbytes` from host `src` to device `dst`. Throws CudaFailure with
  // the first error; by then every copy has ended, every registration the
  // driver still accepts is undone, and the destination's content is
  // undefined. After a sticky error (an illegal address, say) the context is
  // lost and so is what it held: the worker that owns it exits, and the
  // driver frees it all then.
  RestoreReport restore(const void* src, CUdeviceptr dst, size_t nbytes,
                        const RestoreOptions& options);
  // One cuMemcpyHtoD_v2 of the whole region, timed: from pinned memory this
  // is the bus's limit that the strategies are measured against.
  double copy_plain(const void* src, CUdeviceptr dst, size_t nbytes);
  void copy_to_host(void* dst, CUdeviceptr src, size_t nbytes);

  // Destroys the streams and frees the ring; waits for a restore under way.
  void close();
  bool closed();
  const std::shared_ptr<DeviceContext>& device() const { return device_; }

 private:
  void require_open() const;
  double prepare_streams(int count);
  double prepare_ring(size_t bytes);
  void copy_pageable(const char* src, CUdeviceptr dst, size_t nbytes,
                     const RestoreOptions& options, FirstFailure& failure);
  double copy_registered(const char* src, CUdeviceptr dst, size_t nbytes,
                         const RestoreOptions& options, FirstFailure& failure);
  void copy_staged(const char* src, CUdeviceptr dst, size_t nbytes,
                   const RestoreOptions& options, int workers, FirstFailure& failure);

  std::mutex mutex_;
  std::shared_ptr<DeviceContext> device_;
  std::vector<CUstream> streams_;
  std::unique_ptr<PinnedMemory> ring_;
  bool closed_ = false;
};

// Restore worker threads alive in this process (tests check none outlives a restore).
int64_t live_workers();

}  // namespace zerogpu
