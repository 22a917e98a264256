// Python bindings of the copy engine: the private module zerogpu.cuda._ext._engine.
// zerogpu/engine.py is its public face; the low-level Device calls exist so
// tests can drive the driver (real or emulated) one call at a time.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include <string>

#include "driver.h"
#include "emulated.h"
#include "engine.h"
#include "fork.h"
#include "memory.h"

namespace nb = nanobind;
using namespace nb::literals;
using namespace zerogpu;

namespace {

using Release = nb::call_guard<nb::gil_scoped_release>;
using Tensor = nb::ndarray<nb::pytorch, uint8_t, nb::ndim<1>>;

Backend parse_backend(const std::string& name) {
  if (name == "cuda") return Backend::cuda;
  if (name == "emulated") return Backend::emulated;
  throw InvalidArgument("backend '" + name + "' is unknown: use 'cuda' or 'emulated'");
}

Strategy parse_strategy(const std::string& name) {
  if (name == "pageable") return Strategy::pageable;
  if (name == "register") return Strategy::registered;
  if (name == "staging") return Strategy::staging;
  throw InvalidArgument("strategy '" + name + "' is unknown: use 'pageable', 'register' or 'staging'");
}

void* host_pointer(uintptr_t address) { return reinterpret_cast<void*>(address); }

// Raises zerogpu.errors.<name>(*args): the engine's errors are the library's.
template <class... Args>
void raise_zerogpu_error(const char* name, Args&&... args) {
  nb::object type = nb::module_::import_("zerogpu.errors").attr(name);
  nb::object error = type(std::forward<Args>(args)...);
  PyErr_SetObject(type.ptr(), error.ptr());
}

void translate(const std::exception_ptr& exception, void*) {
  try {
    std::rethrow_exception(exception);
  } catch (const DriverUnavailable& e) {
    raise_zerogpu_error("CudaUnavailable", e.what(), e.call(), 0, "");
  } catch (const CudaFailure& e) {
    raise_zerogpu_error("CudaError", e.what(), e.call(), e.code(), e.name());
  } catch (const InvalidArgument& e) {
    raise_zerogpu_error("InvalidArgument", e.what());
  } catch (const std::exception& e) {
    // Anything else (a thread that could not start, memory the host lacks) is
    // still a failure of the engine, inside the library's one error family.
    raise_zerogpu_error("CudaError", std::string("copy engine failure: ") + e.what(), "", 0, "");
  }
}

// How this module was compiled, for `zerogpu info` and bug reports.
nb::dict build_info() {
  nb::dict info;
#if defined(__clang__)
  info["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = "gcc " __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
  info["cxx_standard"] = static_cast<long>(__cplusplus);
  info["build_type"] = ZEROGPU_BUILD_TYPE;
  info["nanobind"] = std::to_string(NB_VERSION_MAJOR) + "." + std::to_string(NB_VERSION_MINOR) + "." +
                     std::to_string(NB_VERSION_PATCH);
  return info;
}

nb::dict to_dict(const emulated::Resources& r) {
  nb::dict d;
  d["allocations"] = r.allocations;
  d["host_allocations"] = r.host_allocations;
  d["registrations"] = r.registrations;
  d["streams"] = r.streams;
  d["events"] = r.events;
  d["stream_threads"] = r.stream_threads;
  d["allocated_bytes"] = r.allocated_bytes;
  d["locked_bytes"] = r.locked_bytes;
  return d;
}

nb::dict to_dict(const emulated::Faults& f) {
  nb::dict d;
  d["fail_after_bytes"] = f.fail_after_bytes;
  d["hang_after_bytes"] = f.hang_after_bytes;
  d["fail_alloc"] = f.fail_alloc;
  d["fail_register"] = f.fail_register;
  return d;
}

// Device memory as a 1-D uint8 tensor that frees it when torch lets it go.
Tensor device_tensor(const std::shared_ptr<DeviceContext>& device, size_t nbytes) {
  auto memory = std::make_unique<DeviceMemory>(device, nbytes);
  void* data = reinterpret_cast<void*>(memory->address());
  nb::capsule owner(memory.get(), [](void* p) noexcept { delete static_cast<DeviceMemory*>(p); });
  memory.release();
  const size_t shape[1] = {nbytes};
  const int device_type = device->driver().backend() == Backend::cuda ? nb::device::cuda::value
                                                                       : nb::device::cpu::value;
  return Tensor(data, 1, shape, owner, nullptr, nb::dtype<uint8_t>(), device_type,
                device->driver().backend() == Backend::cuda ? device->ordinal() : 0);
}

}  // namespace

NB_MODULE(_engine, m) {
  m.doc() = "zerogpu's compiled copy engine (private: use zerogpu.cuda.engine).";
  nb::register_exception_translator(translate);

  nb::class_<Driver>(m, "Driver", "A loaded driver library and its table of functions.")
      .def_static("load", [](const std::string& backend, const std::string& library) {
            return Driver::load(parse_backend(backend), library);
          },
          "backend"_a, "library"_a = "libcuda.so.1",
          "Load libcuda (`library`) or the emulated backend; CudaUnavailable if it cannot be.")
      .def_prop_ro("path", &Driver::path, "The file the functions were loaded from.")
      .def_prop_ro("version", &Driver::version, "cuDriverGetVersion: 12040 for CUDA 12.4.")
      .def_prop_ro("backend", [](const Driver& d) {
        return d.backend() == Backend::cuda ? "cuda" : "emulated";
      });

  nb::class_<DeviceMemory>(m, "DeviceMemory", "One device allocation, freed by free() or when dropped.")
      .def_prop_ro("address", &DeviceMemory::address)
      .def_prop_ro("nbytes", &DeviceMemory::bytes)
      .def("free", &DeviceMemory::free, Release());

  nb::class_<PinnedMemory>(m, "PinnedMemory", "Page-locked host memory, freed by free() or when dropped.")
      .def_prop_ro("address", [](const PinnedMemory& p) { return reinterpret_cast<uintptr_t>(p.address()); })
      .def_prop_ro("nbytes", &PinnedMemory::bytes)
      .def("free", &PinnedMemory::free, Release());

  nb::class_<DeviceContext>(m, "Device", "A device with its primary context retained.")
      .def(nb::init<std::shared_ptr<Driver>, int>(), "driver"_a, "ordinal"_a, Release())
      .def_prop_ro("ordinal", &DeviceContext::ordinal)
      .def_prop_ro("name", &DeviceContext::name)
      .def_prop_ro("total_memory", &DeviceContext::total_memory)
      .def("alloc", [](const std::shared_ptr<DeviceContext>& d, size_t nbytes) {
            return std::make_unique<DeviceMemory>(d, nbytes);
          }, "nbytes"_a, "cuMemAlloc_v2.")
      .def("alloc_pinned", [](const std::shared_ptr<DeviceContext>& d, size_t nbytes) {
            return std::make_unique<PinnedMemory>(d, nbytes);
          }, "nbytes"_a, "cuMemHostAlloc.")
      .def("alloc_tensor", &device_tensor, "nbytes"_a,
           "cuMemAlloc_v2 memory as a uint8 torch tensor that frees it when released.")
      // One driver call each, with this device's context made current first.
      .def("memcpy_htod", [](const DeviceContext& d, uintptr_t dst, uintptr_t src, size_t n) {
            d.make_current();
            d.check(d.api().cuMemcpyHtoD_v2(dst, host_pointer(src), n), "cuMemcpyHtoD_v2");
          }, "dst"_a, "src"_a, "nbytes"_a, Release())
      .def("memcpy_htod_async", [](const DeviceContext& d, uintptr_t dst, uintptr_t src, size_t n,
                                   uintptr_t stream) {
            d.make_current();
            d.check(d.api().cuMemcpyHtoDAsync_v2(dst, host_pointer(src), n,
                                                 reinterpret_cast<CUstream>(stream)),
                    "cuMemcpyHtoDAsync_v2");
          }, "dst"_a, "src"_a, "nbytes"_a, "stream"_a, Release())
      .def("host_register", [](const DeviceContext& d, uintptr_t address, size_t n) {
            d.make_current();
            d.check(d.api().cuMemHostRegister_v2(host_pointer(address), n, d.register_flags()),
                    "cuMemHostRegister_v2");
          }, "address"_a, "nbytes"_a, Release())
      .def("host_unregister", [](const DeviceContext& d, uintptr_t address) {
            d.make_current();
            d.check(d.api().cuMemHostUnregister(host_pointer(address)), "cuMemHostUnregister");
          }, "address"_a, Release())
      .def("stream_create", [](const DeviceContext& d) {
            d.make_current();
            CUstream stream = nullptr;
            d.check(d.api().cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING), "cuStreamCreate");
            return reinterpret_cast<uintptr_t>(stream);
          }, Release())
      .def("stream_synchronize", [](const DeviceContext& d, uintptr_t stream) {
            d.make_current();
            d.check(d.api().cuStreamSynchronize(reinterpret_cast<CUstream>(stream)),
                    "cuStreamSynchronize");
          }, "stream"_a, Release())
      .def("stream_destroy", [](const DeviceContext& d, uintptr_t stream) {
            d.make_current();
            d.check(d.api().cuStreamDestroy_v2(reinterpret_cast<CUstream>(stream)),
                    "cuStreamDestroy_v2");
          }, "stream"_a, Release())
      .def("event_create", [](const DeviceContext& d) {
            d.make_current();
            CUevent event = nullptr;
            d.check(d.api().cuEventCreate(&event, CU_EVENT_DISABLE_TIMING), "cuEventCreate");
            return reinterpret_cast<uintptr_t>(event);
          }, Release())
      .def("event_record", [](const DeviceContext& d, uintptr_t event, uintptr_t stream) {
            d.make_current();
            d.check(d.api().cuEventRecord(reinterpret_cast<CUevent>(event),
                                          reinterpret_cast<CUstream>(stream)),
                    "cuEventRecord");
          }, "event"_a, "stream"_a, Release())
      .def("event_query", [](const DeviceContext& d, uintptr_t event) {
            d.make_current();
            const CUresult result = d.api().cuEventQuery(reinterpret_cast<CUevent>(event));
            if (result == CUDA_ERROR_NOT_READY) return false;
            d.check(result, "cuEventQuery");
            return true;
          }, "event"_a, Release(), "True once the event has happened, False while it has not.")
      .def("event_synchronize", [](const DeviceContext& d, uintptr_t event) {
            d.make_current();
            d.check(d.api().cuEventSynchronize(reinterpret_cast<CUevent>(event)),
                    "cuEventSynchronize");
          }, "event"_a, Release())
      .def("event_destroy", [](const DeviceContext& d, uintptr_t event) {
            d.make_current();
            d.check(d.api().cuEventDestroy_v2(reinterpret_cast<CUevent>(event)),
                    "cuEventDestroy_v2");
          }, "event"_a, Release());

  nb::class_<RestoreReport>(m, "RestoreReport")
      .def_ro("seconds", &RestoreReport::seconds)
      .def_ro("register_seconds", &RestoreReport::register_seconds)
      .def_ro("setup_seconds", &RestoreReport::setup_seconds);

  nb::class_<Engine>(m, "Engine", "Restores host regions into device memory; owns its streams.")
      .def(nb::init<std::shared_ptr<DeviceContext>>(), "device"_a)
      .def("restore", [](Engine& e, uintptr_t src, uintptr_t dst, size_t nbytes,
                         const std::string& strategy, size_t chunk_bytes, int streams, int threads) {
            return e.restore(host_pointer(src), dst, nbytes,
                             RestoreOptions{parse_strategy(strategy), chunk_bytes, streams, threads});
          }, "src"_a, "dst"_a, "nbytes"_a, "strategy"_a, "chunk_bytes"_a, "streams"_a, "threads"_a,
          Release())
      .def("copy_plain", [](Engine& e, uintptr_t src, uintptr_t dst, size_t nbytes) {
            return e.copy_plain(host_pointer(src), dst, nbytes);
          }, "src"_a, "dst"_a, "nbytes"_a, Release(),
          "One timed cuMemcpyHtoD_v2 of the whole region; returns seconds.")
      .def("copy_to_host", [](Engine& e, uintptr_t dst, uintptr_t src, size_t nbytes) {
            e.copy_to_host(host_pointer(dst), src, nbytes);
          }, "dst"_a, "src"_a, "nbytes"_a, Release())
      .def_prop_ro("device", &Engine::device)
      .def_prop_ro("closed", &Engine::closed)
      .def("close", &Engine::close, Release());

  m.def("set_emulated_faults", [](int64_t fail_after_bytes, int64_t hang_after_bytes,
                                  int64_t fail_alloc, int64_t fail_register) {
          emulated::set_faults({fail_after_bytes, hang_after_bytes, fail_alloc, fail_register});
        }, "fail_after_bytes"_a = -1, "hang_after_bytes"_a = -1, "fail_alloc"_a = -1,
        "fail_register"_a = -1, "Faults of the emulated driver; -1 leaves one off.");
  m.def("emulated_faults", [] { return to_dict(emulated::faults()); });
  m.def("emulated_resources", [] { return to_dict(emulated::resources()); },
        "Live objects of the emulated driver, by kind.");
  m.def("configure_emulation", &emulated::configure, "devices"_a,
        "How many devices the emulated driver reports (1 to 64).");
  m.def("live_workers", &live_workers, "Restore worker threads alive in this process.");
  m.def("build_info", &build_info, "Compiler, C++ standard, CMake build type and nanobind version.");
  m.def("fork_holding", &zerogpu::fork_holding, nb::arg("mutexes"),
        "Fork like os.fork(), holding these pthread mutexes (addresses) across fork(2).");
}
