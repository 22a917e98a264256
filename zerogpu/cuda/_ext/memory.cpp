#include "memory.h"

#include <string>

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

template <class Kind>
Allocation<Kind>::Allocation(std::shared_ptr<DeviceContext> device, size_t bytes)
    : device_(std::move(device)), bytes_(bytes) {
  if (bytes == 0) throw InvalidArgument(std::string("cannot allocate 0 bytes of ") + Kind::kWhat);
  device_->make_current();
  device_->check(Kind::allocate(device_->api(), &address_, bytes), Kind::kCall);
}

template <class Kind>
void Allocation<Kind>::free() noexcept {
  if (address_ == Address{}) return;
  if (ready_to_free(*device_)) Kind::release(device_->api(), address_);
  address_ = Address{};
}

template class Allocation<DeviceAllocation>;
template class Allocation<PinnedAllocation>;

}  // namespace zerogpu
