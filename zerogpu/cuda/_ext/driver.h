// Loading the driver's table of functions (from libcuda.so.1 or from the
// emulated backend) and holding a device's primary context.
#pragma once

#include <memory>
#include <stdexcept>
#include <string>

#include <sys/types.h>

#include "driver_api.h"

namespace zerogpu {

enum class Backend { cuda, emulated };

// A driver call returned an error; `what()` reads
// "cuMemAlloc_v2 failed: CUDA_ERROR_OUT_OF_MEMORY (out of memory)".
class CudaFailure : public std::runtime_error {
 public:
  CudaFailure(std::string call, CUresult code, std::string name, const std::string& message)
      : std::runtime_error(message), call_(std::move(call)), code_(code), name_(std::move(name)) {}
  const std::string& call() const { return call_; }
  CUresult code() const { return code_; }
  const std::string& name() const { return name_; }

 private:
  std::string call_;
  CUresult code_;
  std::string name_;
};

// The driver library could not be loaded, or lacks a function the engine needs.
class DriverUnavailable : public std::runtime_error {
 public:
  DriverUnavailable(std::string call, const std::string& message)
      : std::runtime_error(message), call_(std::move(call)) {}
  const std::string& call() const { return call_; }

 private:
  std::string call_;
};

// A value passed to the engine is wrong; raised before anything is taken.
class InvalidArgument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// One loaded driver library and its table of functions.
class Driver {
 public:
  // Loads libcuda from `library` (a file name searched the dynamic linker's
  // way, or a path), or, for the emulated backend, this extension's own
  // zgemu_-prefixed exports through the same dlopen/dlsym path.
  static std::shared_ptr<Driver> load(Backend backend, const std::string& library);
  Driver(const Driver&) = delete;
  Driver& operator=(const Driver&) = delete;

  const DriverApi& api() const { return api_; }
  Backend backend() const { return backend_; }
  const std::string& path() const { return path_; }
  // cuDriverGetVersion, e.g. 12040 for CUDA 12.4; needs no cuInit.
  int version() const;

  // Throws CudaFailure naming `call` unless `result` is CUDA_SUCCESS.
  void check(CUresult result, const char* call) const;
  CudaFailure failure(CUresult result, const char* call) const;

 private:
  Driver(Backend backend, void* handle, std::string path, DriverApi api)
      : backend_(backend), handle_(handle), path_(std::move(path)), api_(api) {}

  Backend backend_;
  void* handle_;
  std::string path_;
  DriverApi api_;
};

// A device with its primary context retained: the context torch's runtime
// uses in the same process, so buffers torch allocates are valid here.
class DeviceContext {
 public:
  DeviceContext(std::shared_ptr<Driver> driver, int ordinal);
  ~DeviceContext();
  DeviceContext(const DeviceContext&) = delete;
  DeviceContext& operator=(const DeviceContext&) = delete;

  const Driver& driver() const { return *driver_; }
  const DriverApi& api() const { return driver_->api(); }
  void check(CUresult result, const char* call) const { driver_->check(result, call); }

  // Makes the primary context current on the calling thread; every thread
  // that calls the driver does this first.
  void make_current() const;
  // Whether this process created the context: a forked child must neither
  // use nor release its parent's driver objects.
  bool owned_here() const;

  int ordinal() const { return ordinal_; }
  const std::string& name() const { return name_; }
  size_t total_memory() const { return total_memory_; }
  // Flags for cuMemHostRegister_v2: read-only where the device allows it,
  // so snapshots mapped read-only can be registered.
  unsigned int register_flags() const { return register_flags_; }

 private:
  std::shared_ptr<Driver> driver_;
  int ordinal_;
  CUdevice device_ = 0;
  CUcontext context_ = nullptr;
  pid_t owner_pid_;
  std::string name_;
  size_t total_memory_ = 0;
  unsigned int register_flags_ = 0;
};

}  // namespace zerogpu
