#include "emulated.h"

#include "host_copy.h"

#include <pthread.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <unordered_set>

namespace zerogpu::emulated {
namespace {

constexpr int kMaxDevices = 64;
// Allocations are page-aligned, as generous as cudaMalloc's alignment.
constexpr size_t kAlignment = 4096;
// Device allocations of at least this are mapped with their pages made at once.
constexpr size_t kPopulated = size_t{2} << 20;
// The table follows the CUDA 12 driver API, so the emulation reports 12.0.
constexpr int kDriverVersion = 12000;
constexpr unsigned int kKnownRegisterFlags = 0x1 | 0x2 | 0x4 | CU_MEMHOSTREGISTER_READ_ONLY;

// Emulated device memory. A restore writes every byte of a fresh buffer
// once, and faulting it in 4 KiB at a time cost more than the copy itself
// (about 1 s per GiB on the machines measured): large allocations are
// mapped with MAP_POPULATE, which makes the pages in one pass (0.6 s).
// Transparent huge pages were tried too: faster at times, several times
// slower at others, when the kernel had to compact memory first.
void* map_device_memory(size_t bytes) {
  if (bytes < kPopulated) {
    void* memory = nullptr;
    return posix_memalign(&memory, kAlignment, bytes) == 0 ? memory : nullptr;
  }
  void* mapped = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  return mapped == MAP_FAILED ? nullptr : mapped;
}

void unmap_device_memory(void* memory, size_t bytes) {
  if (bytes < kPopulated) {
    std::free(memory);
  } else {
    munmap(memory, bytes);
  }
}

struct Copy {
  void* dst;
  const void* src;
  size_t bytes;
  uint64_t ticket;
};

struct Stream {
  std::mutex mutex;
  std::condition_variable work;  // a copy was queued, or the stream is stopping
  std::condition_variable done;  // `completed` moved on
  std::deque<Copy> queue;
  uint64_t enqueued = 0;   // ticket of the last copy queued
  uint64_t completed = 0;  // ticket of the last copy finished
  // The first failure not yet reported by cuStreamSynchronize, and its ticket.
  CUresult error = CUDA_SUCCESS;
  uint64_t error_ticket = 0;
  std::atomic<bool> stopping{false};
  std::thread worker;
};

// An event is a position in one stream's queue: it has happened once the
// stream's thread has finished every copy queued before it was recorded.
struct Event {
  std::mutex mutex;
  std::shared_ptr<Stream> stream;
  uint64_t ticket = 0;
};

struct State {
  std::mutex mutex;
  std::condition_variable faults_changed;
  bool initialized = false;
  int devices = 1;
  size_t memory = 0;
  std::array<size_t, kMaxDevices> used{};
  std::array<int64_t, kMaxDevices> primary_refs{};
  std::unordered_map<uintptr_t, std::pair<int, size_t>> allocations;  // address: device, bytes
  std::unordered_set<uintptr_t> host_allocations;
  std::map<uintptr_t, size_t> registrations;  // ordered, to find overlapping ranges
  // Ranges this driver page-locked (pinned allocations, registrations): address, bytes.
  std::unordered_map<uintptr_t, size_t> locked;
  size_t locked_bytes = 0;
  std::unordered_map<Stream*, std::shared_ptr<Stream>> streams;
  std::unordered_map<Event*, std::shared_ptr<Event>> events;
  int64_t stream_threads = 0;
  Faults faults;
  uint64_t faults_generation = 0;
  // What the faults count, since they were last set.
  int64_t copied = 0;
  int64_t allocated = 0;
  int64_t registered = 0;
};

// Contexts are the addresses of these tokens, one per device.
std::array<char, kMaxDevices> context_tokens;
thread_local int current_device = -1;

void after_fork_in_child();

State& state() {
  // Never destroyed: stream threads may still wait on it while the process exits.
  static State* instance = [] {
    auto* created = new State();
    created->memory = static_cast<size_t>(sysconf(_SC_PHYS_PAGES)) *
                      static_cast<size_t>(sysconf(_SC_PAGESIZE));
    pthread_atfork([] { state().mutex.lock(); }, [] { state().mutex.unlock(); },
                   after_fork_in_child);
    return created;
  }();
  return *instance;
}

// A forked child starts with a fresh driver, as a child process gets a fresh
// CUDA context: the parent's streams have no threads here, so they (and the
// events that point at them) are abandoned rather than destroyed. Faults stay.
void after_fork_in_child() {
  State& s = state();
  s.mutex.unlock();
  new std::unordered_map<Stream*, std::shared_ptr<Stream>>(std::move(s.streams));
  new std::unordered_map<Event*, std::shared_ptr<Event>>(std::move(s.events));
  s.streams.clear();
  s.events.clear();
  s.allocations.clear();
  s.host_allocations.clear();
  s.registrations.clear();
  s.locked.clear();  // a child inherits no page locks
  s.locked_bytes = 0;
  s.used.fill(0);
  s.primary_refs.fill(0);
  s.stream_threads = 0;
  s.initialized = false;
  s.copied = s.allocated = s.registered = 0;
  current_device = -1;
}

CUresult need_init() {
  std::lock_guard lock(state().mutex);
  return state().initialized ? CUDA_SUCCESS : CUDA_ERROR_NOT_INITIALIZED;
}

// The device of the calling thread's current context, as every memory and
// stream call needs one.
CUresult need_context(int* device) {
  State& s = state();
  std::lock_guard lock(s.mutex);
  if (!s.initialized) return CUDA_ERROR_NOT_INITIALIZED;
  if (current_device < 0 || s.primary_refs[current_device] == 0) return CUDA_ERROR_INVALID_CONTEXT;
  *device = current_device;
  return CUDA_SUCCESS;
}

CUresult need_device(CUdevice device) {
  State& s = state();
  std::lock_guard lock(s.mutex);
  if (!s.initialized) return CUDA_ERROR_NOT_INITIALIZED;
  return device >= 0 && device < s.devices ? CUDA_SUCCESS : CUDA_ERROR_INVALID_DEVICE;
}

std::shared_ptr<Stream> find_stream(CUstream handle) {
  State& s = state();
  std::lock_guard lock(s.mutex);
  auto it = s.streams.find(reinterpret_cast<Stream*>(handle));
  return it == s.streams.end() ? nullptr : it->second;
}

// Shared, so an event destroyed while another thread uses it lives until that use ends.
std::shared_ptr<Event> find_event(CUevent handle) {
  State& s = state();
  std::lock_guard lock(s.mutex);
  auto it = s.events.find(reinterpret_cast<Event*>(handle));
  return it == s.events.end() ? nullptr : it->second;
}

// One host-to-device copy, with the byte faults applied. `stopping` (null
// for copies made on the caller's thread) lets a destroyed stream end a stall.
CUresult copy_to_device(void* dst, const void* src, size_t bytes,
                        const std::atomic<bool>* stopping) {
  State& s = state();
  int64_t start = 0;
  Faults faults;
  uint64_t generation = 0;
  {
    std::lock_guard lock(s.mutex);
    start = s.copied;
    s.copied += static_cast<int64_t>(bytes);
    faults = s.faults;
    generation = s.faults_generation;
  }
  const int64_t end = start + static_cast<int64_t>(bytes);
  auto part_before = [&](int64_t limit) {
    return static_cast<size_t>(limit > start ? limit - start : 0);
  };
  if (faults.fail_after_bytes >= 0 && end > faults.fail_after_bytes) {
    copy_streaming(dst, src, part_before(faults.fail_after_bytes));
    return CUDA_ERROR_ILLEGAL_ADDRESS;
  }
  if (faults.hang_after_bytes >= 0 && end > faults.hang_after_bytes) {
    const size_t first = part_before(faults.hang_after_bytes);
    copy_streaming(dst, src, first);
    {
      std::unique_lock lock(s.mutex);
      s.faults_changed.wait(lock, [&] {
        return s.faults_generation != generation || (stopping && stopping->load());
      });
    }
    copy_streaming(static_cast<char*>(dst) + first, static_cast<const char*>(src) + first,
                bytes - first);
    return CUDA_SUCCESS;
  }
  copy_streaming(dst, src, bytes);
  return CUDA_SUCCESS;
}

void run_stream(Stream* stream) {
  for (;;) {
    Copy copy{};
    {
      std::unique_lock lock(stream->mutex);
      stream->work.wait(lock, [&] { return !stream->queue.empty() || stream->stopping.load(); });
      if (stream->queue.empty()) return;  // stopping, and every queued copy is done
      copy = stream->queue.front();
      stream->queue.pop_front();
    }
    const CUresult result = copy_to_device(copy.dst, copy.src, copy.bytes, &stream->stopping);
    {
      std::lock_guard lock(stream->mutex);
      if (result != CUDA_SUCCESS && stream->error == CUDA_SUCCESS) {
        stream->error = result;
        stream->error_ticket = copy.ticket;
      }
      stream->completed = copy.ticket;
    }
    stream->done.notify_all();
  }
}

// Reserves one allocation against the alloc fault; false when it must fail.
bool allocation_allowed(State& s) {
  return s.faults.fail_alloc < 0 || s.allocated < s.faults.fail_alloc;
}

struct ErrorText {
  CUresult code;
  const char* name;
  const char* text;
};

// The driver's own names and descriptions for the codes the emulation returns.
constexpr ErrorText kErrorTexts[] = {
#define ZEROGPU_ERROR_TEXT(name, code, description) {name, #name, description},
    ZEROGPU_CUDA_RESULTS(ZEROGPU_ERROR_TEXT)
#undef ZEROGPU_ERROR_TEXT
};

const ErrorText* error_text(CUresult code) {
  for (const ErrorText& entry : kErrorTexts) {
    if (entry.code == code) return &entry;
  }
  return nullptr;
}

}  // namespace

void set_faults(const Faults& faults) {
  State& s = state();
  {
    std::lock_guard lock(s.mutex);
    s.faults = faults;
    ++s.faults_generation;
    s.copied = s.allocated = s.registered = 0;
  }
  s.faults_changed.notify_all();
}

Faults faults() {
  std::lock_guard lock(state().mutex);
  return state().faults;
}

Resources resources() {
  State& s = state();
  std::lock_guard lock(s.mutex);
  Resources r;
  r.allocations = static_cast<int64_t>(s.allocations.size());
  r.host_allocations = static_cast<int64_t>(s.host_allocations.size());
  r.registrations = static_cast<int64_t>(s.registrations.size());
  r.streams = static_cast<int64_t>(s.streams.size());
  r.events = static_cast<int64_t>(s.events.size());
  r.stream_threads = s.stream_threads;
  r.locked_bytes = static_cast<int64_t>(s.locked_bytes);
  for (size_t used : s.used) r.allocated_bytes += static_cast<int64_t>(used);
  return r;
}

void configure(int devices) {
  State& s = state();
  std::lock_guard lock(s.mutex);
  s.devices = devices < 1 ? 1 : (devices > kMaxDevices ? kMaxDevices : devices);
}

}  // namespace zerogpu::emulated

namespace zerogpu {
using emulated::state;

namespace {
// cuGetErrorName and cuGetErrorString differ only in the field they give.
CUresult describe_error(CUresult error, const char** pStr, const char* emulated::ErrorText::*field) {
  const auto* entry = emulated::error_text(error);
  if (pStr == nullptr || entry == nullptr) {
    if (pStr) *pStr = nullptr;
    return CUDA_ERROR_INVALID_VALUE;
  }
  *pStr = entry->*field;
  return CUDA_SUCCESS;
}
}  // namespace

extern "C" {

CUresult zgemu_cuGetErrorName(CUresult error, const char** pStr) {
  return describe_error(error, pStr, &emulated::ErrorText::name);
}

CUresult zgemu_cuGetErrorString(CUresult error, const char** pStr) {
  return describe_error(error, pStr, &emulated::ErrorText::text);
}

CUresult zgemu_cuInit(unsigned int Flags) {
  if (Flags != 0) return CUDA_ERROR_INVALID_VALUE;
  std::lock_guard lock(state().mutex);
  state().initialized = true;
  return CUDA_SUCCESS;
}

CUresult zgemu_cuDriverGetVersion(int* driverVersion) {
  if (driverVersion == nullptr) return CUDA_ERROR_INVALID_VALUE;
  *driverVersion = emulated::kDriverVersion;
  return CUDA_SUCCESS;
}

CUresult zgemu_cuDeviceGetCount(int* count) {
  if (count == nullptr) return CUDA_ERROR_INVALID_VALUE;
  if (CUresult r = emulated::need_init()) return r;
  std::lock_guard lock(state().mutex);
  *count = state().devices;
  return CUDA_SUCCESS;
}

CUresult zgemu_cuDeviceGet(CUdevice* device, int ordinal) {
  if (device == nullptr) return CUDA_ERROR_INVALID_VALUE;
  if (CUresult r = emulated::need_device(ordinal)) return r;
  *device = ordinal;
  return CUDA_SUCCESS;
}

CUresult zgemu_cuDeviceGetName(char* name, int len, CUdevice dev) {
  if (name == nullptr || len <= 0) return CUDA_ERROR_INVALID_VALUE;
  if (CUresult r = emulated::need_device(dev)) return r;
  std::snprintf(name, static_cast<size_t>(len), "zerogpu emulated device %d", dev);
  return CUDA_SUCCESS;
}

CUresult zgemu_cuDeviceGetAttribute(int* pi, int attrib, CUdevice dev) {
  if (pi == nullptr) return CUDA_ERROR_INVALID_VALUE;
  if (CUresult r = emulated::need_device(dev)) return r;
  // The emulation knows the one attribute the engine asks for.
  if (attrib != CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED) {
    return CUDA_ERROR_INVALID_VALUE;
  }
  *pi = 1;
  return CUDA_SUCCESS;
}

CUresult zgemu_cuDeviceTotalMem_v2(size_t* bytes, CUdevice dev) {
  if (bytes == nullptr) return CUDA_ERROR_INVALID_VALUE;
  if (CUresult r = emulated::need_device(dev)) return r;
  std::lock_guard lock(state().mutex);
  *bytes = state().memory;
  return CUDA_SUCCESS;
}

CUresult zgemu_cuDevicePrimaryCtxRetain(CUcontext* pctx, CUdevice dev) {
  if (pctx == nullptr) return CUDA_ERROR_INVALID_VALUE;
  if (CUresult r = emulated::need_device(dev)) return r;
  std::lock_guard lock(state().mutex);
  ++state().primary_refs[dev];
  *pctx = reinterpret_cast<CUcontext>(&emulated::context_tokens[dev]);
  return CUDA_SUCCESS;
}

CUresult zgemu_cuDevicePrimaryCtxRelease_v2(CUdevice dev) {
  if (CUresult r = emulated::need_device(dev)) return r;
  std::lock_guard lock(state().mutex);
  if (state().primary_refs[dev] == 0) return CUDA_ERROR_INVALID_CONTEXT;
  --state().primary_refs[dev];
  return CUDA_SUCCESS;
}

CUresult zgemu_cuCtxSetCurrent(CUcontext ctx) {
  if (CUresult r = emulated::need_init()) return r;
  if (ctx == nullptr) {
    emulated::current_device = -1;
    return CUDA_SUCCESS;
  }
  const char* token = reinterpret_cast<const char*>(ctx);
  const char* first = emulated::context_tokens.data();
  if (token < first || token >= first + emulated::kMaxDevices) return CUDA_ERROR_INVALID_CONTEXT;
  emulated::current_device = static_cast<int>(token - first);
  return CUDA_SUCCESS;
}

CUresult zgemu_cuMemGetInfo_v2(size_t* free, size_t* total) {
  if (free == nullptr || total == nullptr) return CUDA_ERROR_INVALID_VALUE;
  int device = 0;
  if (CUresult r = emulated::need_context(&device)) return r;
  std::lock_guard lock(state().mutex);
  *total = state().memory;
  *free = state().memory - state().used[device];
  return CUDA_SUCCESS;
}

CUresult zgemu_cuMemAlloc_v2(CUdeviceptr* dptr, size_t bytesize) {
  if (dptr == nullptr || bytesize == 0) return CUDA_ERROR_INVALID_VALUE;
  int device = 0;
  if (CUresult r = emulated::need_context(&device)) return r;
  auto& s = state();
  {
    std::lock_guard lock(s.mutex);
    if (!emulated::allocation_allowed(s) || s.memory - s.used[device] < bytesize) {
      return CUDA_ERROR_OUT_OF_MEMORY;
    }
    s.used[device] += bytesize;  // reserved now, so concurrent allocations cannot overcommit
  }
  void* memory = emulated::map_device_memory(bytesize);
  if (memory == nullptr) {
    std::lock_guard lock(s.mutex);
    s.used[device] -= bytesize;
    return CUDA_ERROR_OUT_OF_MEMORY;
  }
  std::lock_guard lock(s.mutex);
  s.allocations[reinterpret_cast<uintptr_t>(memory)] = {device, bytesize};
  ++s.allocated;
  *dptr = reinterpret_cast<CUdeviceptr>(memory);
  return CUDA_SUCCESS;
}

CUresult zgemu_cuMemFree_v2(CUdeviceptr dptr) {
  int device = 0;
  if (CUresult r = emulated::need_context(&device)) return r;
  auto& s = state();
  size_t bytes = 0;
  {
    std::lock_guard lock(s.mutex);
    auto it = s.allocations.find(static_cast<uintptr_t>(dptr));
    if (it == s.allocations.end()) return CUDA_ERROR_INVALID_VALUE;
    bytes = it->second.second;
    s.used[it->second.first] -= bytes;
    s.allocations.erase(it);
  }
  emulated::unmap_device_memory(reinterpret_cast<void*>(dptr), bytes);
  return CUDA_SUCCESS;
}

namespace emulated {

size_t memlock_limit() {
  rlimit limit{};
  if (getrlimit(RLIMIT_MEMLOCK, &limit) != 0 || limit.rlim_cur == RLIM_INFINITY) return SIZE_MAX;
  return static_cast<size_t>(limit.rlim_cur);
}

// Page-locks [p, p + bytes) as the driver pins host memory, so that pinning
// costs here what it costs on a GPU machine (the kernel faults in and locks
// every page). Within RLIMIT_MEMLOCK only: past it the pages are faulted in
// (written if `fresh`, read otherwise) but not held, which costs the page walk.
void lock_pages(void* p, size_t bytes, bool fresh) {
  auto& s = state();
  bool reserved = false;
  {
    std::lock_guard lock(s.mutex);
    if (s.locked_bytes + bytes <= memlock_limit()) {
      s.locked_bytes += bytes;
      reserved = true;
    }
  }
  if (reserved && mlock(p, bytes) == 0) {
    std::lock_guard lock(s.mutex);
    s.locked.emplace(reinterpret_cast<uintptr_t>(p), bytes);
    return;
  }
  if (reserved) {
    std::lock_guard lock(s.mutex);
    s.locked_bytes -= bytes;
  }
  const auto page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  auto* bytes_at = static_cast<volatile char*>(p);
  for (size_t i = 0; i < bytes; i += page) {
    if (fresh) {
      bytes_at[i] = 0;
    } else {
      (void)bytes_at[i];
    }
  }
}

void unlock_pages(void* p) {
  auto& s = state();
  size_t bytes = 0;
  {
    std::lock_guard lock(s.mutex);
    auto it = s.locked.find(reinterpret_cast<uintptr_t>(p));
    if (it == s.locked.end()) return;
    bytes = it->second;
    s.locked_bytes -= bytes;
    s.locked.erase(it);
  }
  munlock(p, bytes);
}

}  // namespace emulated

CUresult zgemu_cuMemHostAlloc(void** pp, size_t bytesize, unsigned int Flags) {
  (void)Flags;  // portable, mapped and write-combined mean nothing without a device
  if (pp == nullptr || bytesize == 0) return CUDA_ERROR_INVALID_VALUE;
  int device = 0;
  if (CUresult r = emulated::need_context(&device)) return r;
  auto& s = state();
  {
    std::lock_guard lock(s.mutex);
    if (!emulated::allocation_allowed(s)) return CUDA_ERROR_OUT_OF_MEMORY;
  }
  void* memory = nullptr;
  if (posix_memalign(&memory, emulated::kAlignment, bytesize) != 0) return CUDA_ERROR_OUT_OF_MEMORY;
  emulated::lock_pages(memory, bytesize, /*fresh=*/true);
  std::lock_guard lock(s.mutex);
  s.host_allocations.insert(reinterpret_cast<uintptr_t>(memory));
  ++s.allocated;
  *pp = memory;
  return CUDA_SUCCESS;
}

CUresult zgemu_cuMemFreeHost(void* p) {
  int device = 0;
  if (CUresult r = emulated::need_context(&device)) return r;
  auto& s = state();
  {
    std::lock_guard lock(s.mutex);
    if (s.host_allocations.erase(reinterpret_cast<uintptr_t>(p)) == 0) {
      return CUDA_ERROR_INVALID_VALUE;
    }
  }
  emulated::unlock_pages(p);
  std::free(p);
  return CUDA_SUCCESS;
}

CUresult zgemu_cuMemHostRegister_v2(void* p, size_t bytesize, unsigned int Flags) {
  if (p == nullptr || bytesize == 0 || (Flags & ~emulated::kKnownRegisterFlags) != 0) {
    return CUDA_ERROR_INVALID_VALUE;
  }
  int device = 0;
  if (CUresult r = emulated::need_context(&device)) return r;
  auto& s = state();
  std::unique_lock lock(s.mutex);
  if (s.faults.fail_register >= 0 && s.registered >= s.faults.fail_register) {
    return CUDA_ERROR_OUT_OF_MEMORY;  // what the driver says when pages cannot be locked
  }
  const auto start = reinterpret_cast<uintptr_t>(p);
  auto next = s.registrations.upper_bound(start);
  if (next != s.registrations.end() && next->first < start + bytesize) {
    return CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED;
  }
  if (next != s.registrations.begin()) {
    auto previous = std::prev(next);
    if (previous->first + previous->second > start) return CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED;
  }
  s.registrations.emplace(start, bytesize);
  ++s.registered;
  lock.unlock();  // locking the pages takes a while: other calls go on meanwhile
  emulated::lock_pages(p, bytesize, /*fresh=*/false);
  return CUDA_SUCCESS;
}

CUresult zgemu_cuMemHostUnregister(void* p) {
  int device = 0;
  if (CUresult r = emulated::need_context(&device)) return r;
  {
    std::lock_guard lock(state().mutex);
    if (state().registrations.erase(reinterpret_cast<uintptr_t>(p)) == 0) {
      return CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED;
    }
  }
  emulated::unlock_pages(p);
  return CUDA_SUCCESS;
}

CUresult zgemu_cuMemcpyHtoD_v2(CUdeviceptr dstDevice, const void* srcHost, size_t ByteCount) {
  int device = 0;
  if (CUresult r = emulated::need_context(&device)) return r;
  if (ByteCount == 0) return CUDA_SUCCESS;
  if (dstDevice == 0 || srcHost == nullptr) return CUDA_ERROR_INVALID_VALUE;
  return emulated::copy_to_device(reinterpret_cast<void*>(dstDevice), srcHost, ByteCount, nullptr);
}

CUresult zgemu_cuMemcpyHtoDAsync_v2(CUdeviceptr dstDevice, const void* srcHost, size_t ByteCount,
                                    CUstream hStream) {
  int device = 0;
  if (CUresult r = emulated::need_context(&device)) return r;
  if (ByteCount == 0) return CUDA_SUCCESS;
  if (dstDevice == 0 || srcHost == nullptr) return CUDA_ERROR_INVALID_VALUE;
  if (hStream == nullptr) {
    // The legacy default stream: ordered with everything, so done right here.
    return emulated::copy_to_device(reinterpret_cast<void*>(dstDevice), srcHost, ByteCount,
                                    nullptr);
  }
  auto stream = emulated::find_stream(hStream);
  if (!stream) return CUDA_ERROR_INVALID_HANDLE;
  {
    std::lock_guard lock(stream->mutex);
    stream->queue.push_back(
        {reinterpret_cast<void*>(dstDevice), srcHost, ByteCount, ++stream->enqueued});
  }
  stream->work.notify_one();
  return CUDA_SUCCESS;
}

CUresult zgemu_cuMemcpyDtoH_v2(void* dstHost, CUdeviceptr srcDevice, size_t ByteCount) {
  // Byte faults apply to host-to-device copies only: reading a restore back
  // to check it is not part of what they break.
  int device = 0;
  if (CUresult r = emulated::need_context(&device)) return r;
  if (ByteCount == 0) return CUDA_SUCCESS;
  if (dstHost == nullptr || srcDevice == 0) return CUDA_ERROR_INVALID_VALUE;
  std::memcpy(dstHost, reinterpret_cast<const void*>(srcDevice), ByteCount);
  return CUDA_SUCCESS;
}

CUresult zgemu_cuStreamCreate(CUstream* phStream, unsigned int Flags) {
  (void)Flags;  // every emulated stream is non-blocking: nothing runs on the legacy stream
  if (phStream == nullptr) return CUDA_ERROR_INVALID_VALUE;
  int device = 0;
  if (CUresult r = emulated::need_context(&device)) return r;
  auto stream = std::make_shared<emulated::Stream>();
  try {
    stream->worker = std::thread(emulated::run_stream, stream.get());
  } catch (const std::system_error&) {
    return CUDA_ERROR_OUT_OF_MEMORY;
  }
  auto& s = state();
  std::lock_guard lock(s.mutex);
  s.streams.emplace(stream.get(), stream);
  ++s.stream_threads;
  *phStream = reinterpret_cast<CUstream>(stream.get());
  return CUDA_SUCCESS;
}

CUresult zgemu_cuStreamDestroy_v2(CUstream hStream) {
  auto& s = state();
  std::shared_ptr<emulated::Stream> stream;
  {
    std::lock_guard lock(s.mutex);
    auto it = s.streams.find(reinterpret_cast<emulated::Stream*>(hStream));
    if (it == s.streams.end()) return CUDA_ERROR_INVALID_HANDLE;
    stream = std::move(it->second);
    s.streams.erase(it);
  }
  // Queued copies still run, as CUDA finishes a destroyed stream's work; a
  // copy stalled by a hang fault is let go.
  {
    std::lock_guard lock(stream->mutex);
    stream->stopping = true;
  }
  stream->work.notify_all();
  {
    // Taken and dropped so a stalled copy either sees `stopping` or is
    // already waiting when it is notified.
    std::lock_guard lock(s.mutex);
  }
  s.faults_changed.notify_all();
  stream->worker.join();
  std::lock_guard lock(s.mutex);
  --s.stream_threads;
  return CUDA_SUCCESS;
}

CUresult zgemu_cuStreamSynchronize(CUstream hStream) {
  if (CUresult r = emulated::need_init()) return r;
  if (hStream == nullptr) return CUDA_SUCCESS;
  auto stream = emulated::find_stream(hStream);
  if (!stream) return CUDA_ERROR_INVALID_HANDLE;
  std::unique_lock lock(stream->mutex);
  const uint64_t target = stream->enqueued;
  stream->done.wait(lock, [&] { return stream->completed >= target; });
  const CUresult error = stream->error;
  stream->error = CUDA_SUCCESS;  // reported once, here
  return error;
}

CUresult zgemu_cuEventCreate(CUevent* phEvent, unsigned int Flags) {
  (void)Flags;  // events never time anything here
  if (phEvent == nullptr) return CUDA_ERROR_INVALID_VALUE;
  int device = 0;
  if (CUresult r = emulated::need_context(&device)) return r;
  auto event = std::make_shared<emulated::Event>();
  *phEvent = reinterpret_cast<CUevent>(event.get());
  auto& s = state();
  std::lock_guard lock(s.mutex);
  s.events.emplace(event.get(), std::move(event));
  return CUDA_SUCCESS;
}

CUresult zgemu_cuEventRecord(CUevent hEvent, CUstream hStream) {
  std::shared_ptr<emulated::Event> event = emulated::find_event(hEvent);
  if (event == nullptr) return CUDA_ERROR_INVALID_HANDLE;
  std::shared_ptr<emulated::Stream> stream;
  uint64_t ticket = 0;
  if (hStream != nullptr) {
    stream = emulated::find_stream(hStream);
    if (!stream) return CUDA_ERROR_INVALID_HANDLE;
    std::lock_guard lock(stream->mutex);
    ticket = stream->enqueued;
  }
  std::lock_guard lock(event->mutex);
  event->stream = std::move(stream);
  event->ticket = ticket;
  return CUDA_SUCCESS;
}

namespace {
// Waits for (or, with `wait` false, only checks) an event; an error on its
// stream at or before the event is reported, and left for cuStreamSynchronize.
CUresult finish_event(CUevent hEvent, bool wait) {
  std::shared_ptr<emulated::Event> event = emulated::find_event(hEvent);
  if (event == nullptr) return CUDA_ERROR_INVALID_HANDLE;
  std::shared_ptr<emulated::Stream> stream;
  uint64_t ticket = 0;
  {
    std::lock_guard lock(event->mutex);
    stream = event->stream;
    ticket = event->ticket;
  }
  if (!stream) return CUDA_SUCCESS;  // never recorded, or recorded on the legacy stream
  std::unique_lock lock(stream->mutex);
  if (wait) {
    stream->done.wait(lock, [&] { return stream->completed >= ticket; });
  } else if (stream->completed < ticket) {
    return CUDA_ERROR_NOT_READY;
  }
  if (stream->error != CUDA_SUCCESS && stream->error_ticket <= ticket) return stream->error;
  return CUDA_SUCCESS;
}
}  // namespace

CUresult zgemu_cuEventQuery(CUevent hEvent) { return finish_event(hEvent, false); }

CUresult zgemu_cuEventSynchronize(CUevent hEvent) { return finish_event(hEvent, true); }

CUresult zgemu_cuEventDestroy_v2(CUevent hEvent) {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  if (s.events.erase(reinterpret_cast<emulated::Event*>(hEvent)) == 0) {
    return CUDA_ERROR_INVALID_HANDLE;
  }
  return CUDA_SUCCESS;
}

}  // extern "C"
}  // namespace zerogpu
