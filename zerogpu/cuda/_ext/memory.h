// Device and pinned host allocations owned by an object, freed when it goes.
#pragma once

#include <memory>

#include "driver.h"

namespace zerogpu {

// One cuMemAlloc_v2 allocation.
class DeviceMemory {
 public:
  DeviceMemory(std::shared_ptr<DeviceContext> device, size_t bytes);
  ~DeviceMemory() { free(); }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;

  // Frees the memory now; later calls do nothing. Never throws: it runs from
  // destructors and tensor deleters.
  void free() noexcept;
  CUdeviceptr address() const { return address_; }
  size_t bytes() const { return bytes_; }
  const DeviceContext& device() const { return *device_; }

 private:
  std::shared_ptr<DeviceContext> device_;
  CUdeviceptr address_ = 0;
  size_t bytes_;
};

// One cuMemHostAlloc allocation: page-locked host memory the DMA engine reads directly.
class PinnedMemory {
 public:
  PinnedMemory(std::shared_ptr<DeviceContext> device, size_t bytes);
  ~PinnedMemory() { free(); }
  PinnedMemory(const PinnedMemory&) = delete;
  PinnedMemory& operator=(const PinnedMemory&) = delete;

  void free() noexcept;
  void* address() const { return address_; }
  size_t bytes() const { return bytes_; }

 private:
  std::shared_ptr<DeviceContext> device_;
  void* address_ = nullptr;
  size_t bytes_;
};

}  // namespace zerogpu
