#include "engine.h"

#include "host_copy.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <deque>
#include <exception>
#include <thread>

namespace zerogpu {
namespace {

using Clock = std::chrono::steady_clock;

// How many registered chunks one worker keeps in flight: enough that
// registering the next chunk overlaps the copies of the ones before.
constexpr size_t kRegisteredAhead = 4;
// Staging slots per worker: one filled by memcpy while the other drains.
constexpr size_t kSlotsPerWorker = 2;
// The most slots a staging ring has, whatever the threads asked: pinning costs
// about a second per GB on a GPU machine, paid by every worker that makes a
// ring, so a ring is a few chunks, not a share of the model.
constexpr size_t kMaxRingSlots = 8;

std::atomic<int64_t> workers_alive{0};

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

size_t ceil_div(size_t a, size_t b) { return (a + b - 1) / b; }

// The copy threads for `chunks` pieces: as many as asked, but no idle ones.
int workers_for(const RestoreOptions& options, size_t chunks) {
  return static_cast<int>(std::min<size_t>(static_cast<size_t>(options.threads), chunks));
}

}  // namespace

// The first error of a restore, from whichever thread saw it; the others
// stop at their next chunk.
class FirstFailure {
 public:
  explicit FirstFailure(const DeviceContext& device) : device_(device) {}
  void record(std::exception_ptr error) {
    std::lock_guard lock(mutex_);
    if (!error_) error_ = std::move(error);
    failed_.store(true, std::memory_order_relaxed);
  }
  // For cleanup paths, which note an error and carry on.
  void check(CUresult result, const char* call) {
    if (result != CUDA_SUCCESS) record(std::make_exception_ptr(device_.driver().failure(result, call)));
  }
  bool happened() const { return failed_.load(std::memory_order_relaxed); }
  void rethrow() {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  const DeviceContext& device_;
  std::mutex mutex_;
  std::exception_ptr error_;
  std::atomic<bool> failed_{false};
};

namespace {

// Runs work(0) on the calling thread and work(1..threads-1) on new threads,
// each with the context current; every exception is recorded, none escapes.
template <class Work>
void run_workers(const DeviceContext& device, int threads, FirstFailure& failure, Work work) {
  std::vector<std::thread> spawned;
  spawned.reserve(static_cast<size_t>(threads - 1));
  for (int t = 1; t < threads; ++t) {
    try {
      spawned.emplace_back([&device, &failure, &work, t] {
        ++workers_alive;
        try {
          device.make_current();
          work(t);
        } catch (...) {
          failure.record(std::current_exception());
        }
        --workers_alive;
      });
    } catch (...) {
      failure.record(std::current_exception());
      break;
    }
  }
  try {
    work(0);
  } catch (...) {
    failure.record(std::current_exception());
  }
  for (std::thread& thread : spawned) thread.join();
}

// A region's chunks, claimed one at a time by whichever worker is free, so a
// slow chunk holds back no other; claiming stops once any worker has failed.
class ChunkClaims {
 public:
  ChunkClaims(size_t chunks, FirstFailure& failure) : chunks_(chunks), failure_(failure) {}
  size_t chunks() const { return chunks_; }
  // Runs work(index) for each chunk this worker claims. An exception is
  // recorded and ends this worker's claims, so the worker's cleanup still runs.
  template <class Work>
  void claim_each(Work&& work) noexcept {
    try {
      for (size_t i = 0; !failure_.happened() && (i = next_++) < chunks_;) work(i);
    } catch (...) {
      failure_.record(std::current_exception());
    }
  }

 private:
  const size_t chunks_;
  FirstFailure& failure_;
  std::atomic<size_t> next_{0};
};

// A copy queued on a stream that reads host memory: the memory may be
// reused or unregistered only after wait() has returned, whatever it returns.
class PendingCopy {
 public:
  explicit PendingCopy(const DeviceContext& device) : device_(device) {
    device.check(device.api().cuEventCreate(&event_, CU_EVENT_DISABLE_TIMING), "cuEventCreate");
  }
  ~PendingCopy() { device_.api().cuEventDestroy_v2(event_); }
  PendingCopy(const PendingCopy&) = delete;
  PendingCopy& operator=(const PendingCopy&) = delete;

  // Call right after the copy was queued on `stream`.
  void queued_on(CUstream stream) {
    stream_ = stream;
    // Should the event fail to record, wait() falls back on the whole stream,
    // which is slower but as safe; the stream reports its own errors.
    recorded_ = device_.api().cuEventRecord(event_, stream) == CUDA_SUCCESS;
  }
  // Waits for the copy; throws its error once it has ended.
  void wait() {
    if (stream_ == nullptr) return;
    const CUresult result = recorded_ ? device_.api().cuEventSynchronize(event_)
                                      : device_.api().cuStreamSynchronize(stream_);
    stream_ = nullptr;
    device_.check(result, recorded_ ? "cuEventSynchronize" : "cuStreamSynchronize");
  }

 private:
  const DeviceContext& device_;
  CUevent event_ = nullptr;
  CUstream stream_ = nullptr;
  bool recorded_ = false;
};

// One worker's registered chunks whose copies may still run, oldest first.
class RegisteredChunks {
 public:
  RegisteredChunks(const DeviceContext& device, FirstFailure& failure)
      : device_(device), failure_(failure) {}
  ~RegisteredChunks() { drain(); }

  bool full() const { return in_flight_.size() >= kRegisteredAhead; }
  // Registers [address, address + bytes); the chunk's copy is queued next.
  // Memory that something else in the process already page-locked is copied
  // as it is and left registered: the copy is correct either way (the driver
  // stages whatever part is not locked), and the registration is not ours.
  PendingCopy& add(void* address, size_t bytes) {
    std::unique_ptr<PendingCopy> copy;
    if (spare_.empty()) {
      copy = std::make_unique<PendingCopy>(device_);
    } else {
      copy = std::move(spare_.back());
      spare_.pop_back();
    }
    const auto start = Clock::now();
    const CUresult result =
        device_.api().cuMemHostRegister_v2(address, bytes, device_.register_flags());
    seconds_ += seconds_since(start);
    const bool ours = result == CUDA_SUCCESS;
    if (!ours && result != CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED) {
      spare_.push_back(std::move(copy));
      device_.check(result, "cuMemHostRegister_v2");
    }
    in_flight_.push_back({address, ours, std::move(copy)});
    return *in_flight_.back().copy;
  }
  // Waits for the oldest chunk's copy and unregisters it (if this engine
  // registered it); throws the first error after the chunk is released.
  void retire_oldest() {
    Chunk chunk = std::move(in_flight_.front());
    in_flight_.pop_front();
    std::exception_ptr waited;
    try {
      chunk.copy->wait();
    } catch (...) {
      waited = std::current_exception();
    }
    CUresult result = CUDA_SUCCESS;
    if (chunk.ours) {
      const auto start = Clock::now();
      result = device_.api().cuMemHostUnregister(chunk.address);
      seconds_ += seconds_since(start);
    }
    spare_.push_back(std::move(chunk.copy));
    if (waited) std::rethrow_exception(waited);
    device_.check(result, "cuMemHostUnregister");
  }
  // Retires every chunk, recording errors instead of throwing them.
  void drain() noexcept {
    while (!in_flight_.empty()) {
      try {
        retire_oldest();
      } catch (...) {
        failure_.record(std::current_exception());
      }
    }
  }
  double seconds() const { return seconds_; }

 private:
  struct Chunk {
    void* address;
    bool ours;  // registered by this engine, so unregistered by it
    std::unique_ptr<PendingCopy> copy;
  };
  const DeviceContext& device_;
  FirstFailure& failure_;
  std::deque<Chunk> in_flight_;
  std::vector<std::unique_ptr<PendingCopy>> spare_;
  double seconds_ = 0;
};

// One worker's slots of the staging ring.
class StagingSlots {
 public:
  StagingSlots(const DeviceContext& device, char* first, size_t slot_bytes) {
    for (size_t i = 0; i < kSlotsPerWorker; ++i) {
      slots_.push_back({first + i * slot_bytes, std::make_unique<PendingCopy>(device)});
    }
  }
  ~StagingSlots() { drain(nullptr); }
  // The next slot, once the copy out of it has ended.
  std::pair<char*, PendingCopy*> next() {
    Slot& slot = slots_[used_++ % slots_.size()];
    slot.copy->wait();
    return {slot.address, slot.copy.get()};
  }
  void drain(FirstFailure* failure) noexcept {
    for (Slot& slot : slots_) {
      try {
        slot.copy->wait();
      } catch (...) {
        if (failure) failure->record(std::current_exception());
      }
    }
  }

 private:
  struct Slot {
    char* address;
    std::unique_ptr<PendingCopy> copy;
  };
  std::vector<Slot> slots_;
  size_t used_ = 0;
};

}  // namespace

Engine::Engine(std::shared_ptr<DeviceContext> device) : device_(std::move(device)) {}

void Engine::require_open() const {
  if (closed_) throw InvalidArgument("this engine is closed; create a new Engine");
  if (!device_->owned_here()) {
    throw InvalidArgument(
        "this engine belongs to the process that created it; a forked child must create its "
        "own Engine");
  }
}

bool Engine::closed() {
  std::lock_guard lock(mutex_);
  return closed_;
}

void Engine::close() {
  std::lock_guard lock(mutex_);
  if (closed_) return;
  closed_ = true;
  // A forked child's copy of the engine owns nothing in the child's driver.
  if (!device_->owned_here()) return;
  try {
    device_->make_current();
  } catch (...) {
    return;  // the context is gone, and what it held with it
  }
  for (CUstream stream : streams_) device_->api().cuStreamDestroy_v2(stream);
  streams_.clear();
  ring_.reset();
}

double Engine::prepare_streams(int count) {
  if (streams_.size() >= static_cast<size_t>(count)) return 0;
  const auto start = Clock::now();
  while (streams_.size() < static_cast<size_t>(count)) {
    CUstream stream = nullptr;
    device_->check(device_->api().cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING),
                   "cuStreamCreate");
    streams_.push_back(stream);
  }
  return seconds_since(start);
}

double Engine::prepare_ring(size_t bytes) {
  if (ring_ && ring_->bytes() >= bytes) return 0;
  const auto start = Clock::now();
  ring_.reset();
  ring_ = std::make_unique<PinnedMemory>(device_, bytes);
  return seconds_since(start);
}

RestoreReport Engine::restore(const void* src, CUdeviceptr dst, size_t nbytes,
                              const RestoreOptions& options) {
  if (src == nullptr || dst == 0) throw InvalidArgument("source and destination must not be null");
  if (nbytes == 0) throw InvalidArgument("nothing to restore: nbytes is 0");
  if (options.chunk_bytes == 0) throw InvalidArgument("chunk_bytes must be positive");
  if (options.streams < 1 || options.threads < 1) {
    throw InvalidArgument("streams and threads must be at least 1");
  }
  std::lock_guard lock(mutex_);
  require_open();
  const auto start = Clock::now();
  device_->make_current();
  RestoreReport report;
  const bool uses_streams = options.strategy != Strategy::pageable;
  if (uses_streams) report.setup_seconds += prepare_streams(options.streams);

  FirstFailure failure(*device_);
  const auto* from = static_cast<const char*>(src);
  switch (options.strategy) {
    case Strategy::pageable:
      copy_pageable(from, dst, nbytes, options, failure);
      break;
    case Strategy::registered:
      report.register_seconds = copy_registered(from, dst, nbytes, options, failure);
      break;
    case Strategy::staging: {
      // The ring has kSlotsPerWorker slots for each worker: the count is made once, here.
      const int workers = static_cast<int>(std::min<size_t>(
          workers_for(options, ceil_div(nbytes, options.chunk_bytes)), kMaxRingSlots / kSlotsPerWorker));
      report.setup_seconds += prepare_ring(static_cast<size_t>(workers) * kSlotsPerWorker * options.chunk_bytes);
      copy_staged(from, dst, nbytes, options, workers, failure);
      break;
    }
  }
  if (uses_streams) {
    for (int i = 0; i < options.streams; ++i) {
      failure.check(device_->api().cuStreamSynchronize(streams_[static_cast<size_t>(i)]),
                    "cuStreamSynchronize");
    }
  } else {
    // A copy from pageable memory returns once the bytes are staged, not when
    // they have arrived: wait for the legacy stream it ran on.
    failure.check(device_->api().cuStreamSynchronize(nullptr), "cuStreamSynchronize");
  }
  failure.rethrow();
  report.seconds = seconds_since(start);
  return report;
}

void Engine::copy_pageable(const char* src, CUdeviceptr dst, size_t nbytes,
                           const RestoreOptions& options, FirstFailure& failure) {
  const size_t chunk = options.chunk_bytes;
  ChunkClaims claims(ceil_div(nbytes, chunk), failure);
  run_workers(*device_, workers_for(options, claims.chunks()), failure, [&](int) {
    claims.claim_each([&](size_t i) {
      const size_t offset = i * chunk;
      device_->check(
          device_->api().cuMemcpyHtoD_v2(dst + offset, src + offset, std::min(chunk, nbytes - offset)),
          "cuMemcpyHtoD_v2");
    });
  });
}

double Engine::copy_registered(const char* src, CUdeviceptr dst, size_t nbytes,
                               const RestoreOptions& options, FirstFailure& failure) {
  // Registration works on whole pages. A page holding any byte of the region
  // is mapped, so the page-aligned cover of the region can be registered,
  // and chunks cut at page boundaries never share a page.
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t first = reinterpret_cast<uintptr_t>(src);
  const uintptr_t last = first + nbytes;
  const uintptr_t begin = first / page * page;
  const uintptr_t end = (last + page - 1) / page * page;
  const size_t chunk = (options.chunk_bytes + page - 1) / page * page;
  ChunkClaims claims(ceil_div(end - begin, chunk), failure);
  std::mutex timing;
  double register_seconds = 0;
  run_workers(*device_, workers_for(options, claims.chunks()), failure, [&](int) {
    RegisteredChunks registered(*device_, failure);
    claims.claim_each([&](size_t i) {
      if (registered.full()) registered.retire_oldest();
      const uintptr_t low = begin + i * chunk;
      const uintptr_t high = std::min<uintptr_t>(low + chunk, end);
      PendingCopy& copy = registered.add(reinterpret_cast<void*>(low), high - low);
      const uintptr_t copy_from = std::max(low, first);
      const uintptr_t copy_to = std::min(high, last);
      CUstream stream = streams_[i % static_cast<size_t>(options.streams)];
      device_->check(device_->api().cuMemcpyHtoDAsync_v2(dst + (copy_from - first),
                                                         reinterpret_cast<const void*>(copy_from),
                                                         copy_to - copy_from, stream),
                     "cuMemcpyHtoDAsync_v2");
      copy.queued_on(stream);
    });
    registered.drain();
    std::lock_guard lock(timing);
    register_seconds += registered.seconds();
  });
  return register_seconds;
}

void Engine::copy_staged(const char* src, CUdeviceptr dst, size_t nbytes,
                         const RestoreOptions& options, int workers, FirstFailure& failure) {
  const size_t chunk = options.chunk_bytes;
  ChunkClaims claims(ceil_div(nbytes, chunk), failure);
  auto* ring = static_cast<char*>(ring_->address());
  run_workers(*device_, workers, failure, [&](int worker) {
    StagingSlots slots(*device_, ring + static_cast<size_t>(worker) * kSlotsPerWorker * chunk, chunk);
    CUstream stream = streams_[static_cast<size_t>(worker % options.streams)];
    claims.claim_each([&](size_t i) {
      const size_t offset = i * chunk;
      const size_t bytes = std::min(chunk, nbytes - offset);
      auto [slot, copy] = slots.next();
      copy_streaming(slot, src + offset, bytes);
      device_->check(device_->api().cuMemcpyHtoDAsync_v2(dst + offset, slot, bytes, stream),
                     "cuMemcpyHtoDAsync_v2");
      copy->queued_on(stream);
    });
    slots.drain(&failure);
  });
}

double Engine::copy_plain(const void* src, CUdeviceptr dst, size_t nbytes) {
  if (src == nullptr || dst == 0 || nbytes == 0) {
    throw InvalidArgument("source, destination and nbytes must not be 0");
  }
  std::lock_guard lock(mutex_);
  require_open();
  device_->make_current();
  const auto start = Clock::now();
  device_->check(device_->api().cuMemcpyHtoD_v2(dst, src, nbytes), "cuMemcpyHtoD_v2");
  // From pageable memory the call returns once the bytes are staged: wait for the DMA.
  device_->check(device_->api().cuStreamSynchronize(nullptr), "cuStreamSynchronize");
  return seconds_since(start);
}

void Engine::copy_to_host(void* dst, CUdeviceptr src, size_t nbytes) {
  if (dst == nullptr || src == 0 || nbytes == 0) {
    throw InvalidArgument("source, destination and nbytes must not be 0");
  }
  std::lock_guard lock(mutex_);
  require_open();
  device_->make_current();
  device_->check(device_->api().cuMemcpyDtoH_v2(dst, src, nbytes), "cuMemcpyDtoH_v2");
}

int64_t live_workers() { return workers_alive.load(); }

}  // namespace zerogpu
