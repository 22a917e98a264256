#include "driver.h"

#include <dlfcn.h>
#include <link.h>
#include <unistd.h>

#include <array>

namespace zerogpu {
namespace {

constexpr const char* kEmulatedPrefix = "zgemu_";

// The file this extension was loaded from: the emulated backend's functions
// are exported from it, and loading them with dlopen/dlsym like libcuda's
// sends the emulated backend down the very path the real driver takes.
std::string extension_path() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&extension_path), &info) == 0 || info.dli_fname == nullptr) {
    throw DriverUnavailable("dladdr", "could not find the file of zerogpu's compiled engine");
  }
  return info.dli_fname;
}

std::string loaded_from(void* handle, const std::string& fallback) {
  link_map* map = nullptr;
  if (dlinfo(handle, RTLD_DI_LINKMAP, &map) == 0 && map != nullptr && map->l_name != nullptr &&
      map->l_name[0] != '\0') {
    return map->l_name;
  }
  return fallback;
}

std::string unavailable_message(const std::string& library, const char* reason) {
  std::string message = std::string("could not load the CUDA driver library: ") + reason + ". ";
  if (library.find('/') == std::string::npos) {
    message += "It was looked up as the dynamic linker does (LD_LIBRARY_PATH, then the cache that "
               "`ldconfig -p | grep libcuda` lists). ";
  }
  return message + "Install the NVIDIA driver (or put the directory holding libcuda.so.1 on "
                   "LD_LIBRARY_PATH), or run on the emulated backend (ZEROGPU_BACKEND=emulated).";
}

}  // namespace

std::shared_ptr<Driver> Driver::load(Backend backend, const std::string& library) {
  const bool emulated = backend == Backend::emulated;
  const std::string file = emulated ? extension_path() : library;
  dlerror();
  void* handle = dlopen(file.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* reason = dlerror();
    throw DriverUnavailable("dlopen", unavailable_message(file, reason ? reason : "unknown error"));
  }
  const std::string path = loaded_from(handle, file);
  const std::string prefix = emulated ? kEmulatedPrefix : "";
  DriverApi api;
  std::string missing;
#define ZEROGPU_LOAD_POINTER(name, params)                                          \
  api.name = reinterpret_cast<decltype(api.name)>(                                  \
      dlsym(handle, (prefix + #name).c_str()));                                     \
  if (api.name == nullptr) missing += (missing.empty() ? "" : ", ") + prefix + #name;
  ZEROGPU_DRIVER_FUNCTIONS(ZEROGPU_LOAD_POINTER)
#undef ZEROGPU_LOAD_POINTER
  if (!missing.empty()) {
    dlclose(handle);
    throw DriverUnavailable(
        "dlsym", path + " does not export " + missing +
                     ": it is not a CUDA driver, or one older than CUDA 11.0 (the oldest that "
                     "has every function zerogpu uses); install a current NVIDIA driver");
  }
  // The handle is never closed: libcuda starts threads and registers exit
  // handlers, and unloading it while the process runs is not safe.
  return std::shared_ptr<Driver>(new Driver(backend, handle, path, api));
}

int Driver::version() const {
  int version = 0;
  check(api_.cuDriverGetVersion(&version), "cuDriverGetVersion");
  return version;
}

CudaFailure Driver::failure(CUresult result, const char* call) const {
  const char* name = nullptr;
  const char* text = nullptr;
  std::string error_name = api_.cuGetErrorName(result, &name) == CUDA_SUCCESS && name
                               ? name
                               : "CUDA error " + std::to_string(result);
  std::string error_text = api_.cuGetErrorString(result, &text) == CUDA_SUCCESS && text
                               ? text
                               : "no description from the driver";
  return CudaFailure(call, result, error_name,
                     std::string(call) + " failed: " + error_name + " (" + error_text + ")");
}

void Driver::check(CUresult result, const char* call) const {
  if (result != CUDA_SUCCESS) throw failure(result, call);
}

DeviceContext::DeviceContext(std::shared_ptr<Driver> driver, int ordinal)
    : driver_(std::move(driver)), ordinal_(ordinal), owner_pid_(getpid()) {
  const DriverApi& cu = api();
  check(cu.cuInit(0), "cuInit");
  int count = 0;
  check(cu.cuDeviceGetCount(&count), "cuDeviceGetCount");
  if (ordinal < 0 || ordinal >= count) {
    throw InvalidArgument("device " + std::to_string(ordinal) + " does not exist: the driver sees " +
                          std::to_string(count) + " device(s); use an index from 0 to " +
                          std::to_string(count - 1));
  }
  check(cu.cuDeviceGet(&device_, ordinal), "cuDeviceGet");
  std::array<char, 256> name{};
  check(cu.cuDeviceGetName(name.data(), static_cast<int>(name.size()), device_), "cuDeviceGetName");
  name_ = name.data();
  check(cu.cuDeviceTotalMem_v2(&total_memory_, device_), "cuDeviceTotalMem_v2");
  int read_only = 0;
  check(cu.cuDeviceGetAttribute(&read_only, CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED,
                                device_),
        "cuDeviceGetAttribute");
  register_flags_ = read_only ? CU_MEMHOSTREGISTER_READ_ONLY : 0;
  check(cu.cuDevicePrimaryCtxRetain(&context_, device_), "cuDevicePrimaryCtxRetain");
  try {
    make_current();
  } catch (...) {
    cu.cuDevicePrimaryCtxRelease_v2(device_);
    throw;
  }
}

DeviceContext::~DeviceContext() {
  if (owned_here()) api().cuDevicePrimaryCtxRelease_v2(device_);
}

void DeviceContext::make_current() const {
  check(api().cuCtxSetCurrent(context_), "cuCtxSetCurrent");
}

bool DeviceContext::owned_here() const { return getpid() == owner_pid_; }

}  // namespace zerogpu
