#include "memory.h"

namespace zerogpu {
namespace {

// Whether the driver may be called to free: only in the process that
// allocated, and with the context current on this (any) thread.
bool ready_to_free(const DeviceContext& device) noexcept {
  if (!device.owned_here()) return false;
  try {
    device.make_current();
    return true;
  } catch (...) {
    return false;
  }
}

}  // namespace

DeviceMemory::DeviceMemory(std::shared_ptr<DeviceContext> device, size_t bytes)
    : device_(std::move(device)), bytes_(bytes) {
  if (bytes == 0) throw InvalidArgument("cannot allocate 0 bytes of device memory");
  device_->make_current();
  device_->check(device_->api().cuMemAlloc_v2(&address_, bytes), "cuMemAlloc_v2");
}

void DeviceMemory::free() noexcept {
  if (address_ == 0) return;
  if (ready_to_free(*device_)) device_->api().cuMemFree_v2(address_);
  address_ = 0;
}

PinnedMemory::PinnedMemory(std::shared_ptr<DeviceContext> device, size_t bytes)
    : device_(std::move(device)), bytes_(bytes) {
  if (bytes == 0) throw InvalidArgument("cannot allocate 0 bytes of pinned memory");
  device_->make_current();
  device_->check(device_->api().cuMemHostAlloc(&address_, bytes, 0), "cuMemHostAlloc");
}

void PinnedMemory::free() noexcept {
  if (address_ == nullptr) return;
  if (ready_to_free(*device_)) device_->api().cuMemFreeHost(address_);
  address_ = nullptr;
}

}  // namespace zerogpu
