// Device and pinned host allocations owned by an object, freed when it goes.
#pragma once

#include <memory>

#include "driver.h"

namespace zerogpu {

// What sets the two kinds of allocation apart: the address type and the
// driver calls that allocate and free.
struct DeviceAllocation {
  using Address = CUdeviceptr;
  static constexpr const char* kWhat = "device memory";
  static constexpr const char* kCall = "cuMemAlloc_v2";
  static CUresult allocate(const DriverApi& cu, Address* address, size_t bytes) {
    return cu.cuMemAlloc_v2(address, bytes);
  }
  static void release(const DriverApi& cu, Address address) { cu.cuMemFree_v2(address); }
};

// Page-locked host memory the DMA engine reads directly.
struct PinnedAllocation {
  using Address = void*;
  static constexpr const char* kWhat = "pinned memory";
  static constexpr const char* kCall = "cuMemHostAlloc";
  static CUresult allocate(const DriverApi& cu, Address* address, size_t bytes) {
    return cu.cuMemHostAlloc(address, bytes, 0);
  }
  static void release(const DriverApi& cu, Address address) { cu.cuMemFreeHost(address); }
};

// One allocation of `Kind`, freed by free() or when the object goes.
template <class Kind>
class Allocation {
 public:
  using Address = typename Kind::Address;
  Allocation(std::shared_ptr<DeviceContext> device, size_t bytes);
  ~Allocation() { free(); }
  Allocation(const Allocation&) = delete;
  Allocation& operator=(const Allocation&) = delete;

  // Frees the memory now; later calls do nothing. Never throws: it runs from
  // destructors and tensor deleters.
  void free() noexcept;
  Address address() const { return address_; }
  size_t bytes() const { return bytes_; }

 private:
  std::shared_ptr<DeviceContext> device_;
  Address address_{};
  size_t bytes_;
};

// Defined in memory.cpp for these two kinds only.
extern template class Allocation<DeviceAllocation>;
extern template class Allocation<PinnedAllocation>;

// One cuMemAlloc_v2 allocation.
using DeviceMemory = Allocation<DeviceAllocation>;
// One cuMemHostAlloc allocation.
using PinnedMemory = Allocation<PinnedAllocation>;

}  // namespace zerogpu
