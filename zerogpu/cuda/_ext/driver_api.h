// The slice of the CUDA driver API the copy engine uses, declared here so the
// extension builds without a CUDA toolkit. Types and signatures are the
// driver's own (cuda.h, CUDA 12); functions are named as libcuda.so.1 exports
// them, versioned (_v2) where the driver has a versioned symbol.
#pragma once

#include <cstddef>

namespace zerogpu {

using CUresult = int;
using CUdevice = int;
using CUdeviceptr = unsigned long long;
using CUcontext = struct CUctx_st*;
using CUstream = struct CUstream_st*;
using CUevent = struct CUevent_st*;

// X(name, code, description): the result codes the engine and the emulated
// backend produce or test for, with the driver's own descriptions (what
// cuGetErrorString answers). Written once so the enum and the emulated
// backend's names and texts cannot disagree.
#define ZEROGPU_CUDA_RESULTS(X)                                                             \
  X(CUDA_SUCCESS, 0, "no error")                                                            \
  X(CUDA_ERROR_INVALID_VALUE, 1, "invalid argument")                                        \
  X(CUDA_ERROR_OUT_OF_MEMORY, 2, "out of memory")                                           \
  X(CUDA_ERROR_NOT_INITIALIZED, 3, "initialization error")                                  \
  X(CUDA_ERROR_NO_DEVICE, 100, "no CUDA-capable device is detected")                        \
  X(CUDA_ERROR_INVALID_DEVICE, 101, "invalid device ordinal")                               \
  X(CUDA_ERROR_INVALID_CONTEXT, 201, "invalid device context")                              \
  X(CUDA_ERROR_INVALID_HANDLE, 400, "invalid resource handle")                              \
  X(CUDA_ERROR_NOT_READY, 600, "device not ready")                                          \
  X(CUDA_ERROR_ILLEGAL_ADDRESS, 700, "an illegal memory access was encountered")            \
  X(CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED, 712,                                         \
    "part or all of the requested memory range is already mapped")                          \
  X(CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED, 713,                                             \
    "pointer does not correspond to a registered memory region")

enum : CUresult {
#define ZEROGPU_DECLARE_RESULT(name, code, description) name = code,
  ZEROGPU_CUDA_RESULTS(ZEROGPU_DECLARE_RESULT)
#undef ZEROGPU_DECLARE_RESULT
};

constexpr unsigned int CU_STREAM_NON_BLOCKING = 0x1;
constexpr unsigned int CU_EVENT_DISABLE_TIMING = 0x2;
constexpr unsigned int CU_MEMHOSTREGISTER_READ_ONLY = 0x08;
constexpr int CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED = 113;

// X(name, parameter list): every driver function in the table. The list is
// written once so the table, the loader and the emulated backend cannot
// disagree on a name or a signature.
#define ZEROGPU_DRIVER_FUNCTIONS(X)                                                         \
  X(cuGetErrorName, (CUresult error, const char** pStr))                                  \
  X(cuGetErrorString, (CUresult error, const char** pStr))                                \
  X(cuInit, (unsigned int Flags))                                                         \
  X(cuDriverGetVersion, (int* driverVersion))                                             \
  X(cuDeviceGetCount, (int* count))                                                       \
  X(cuDeviceGet, (CUdevice * device, int ordinal))                                        \
  X(cuDeviceGetName, (char* name, int len, CUdevice dev))                                 \
  X(cuDeviceGetAttribute, (int* pi, int attrib, CUdevice dev))                            \
  X(cuDeviceTotalMem_v2, (size_t * bytes, CUdevice dev))                                  \
  X(cuDevicePrimaryCtxRetain, (CUcontext * pctx, CUdevice dev))                           \
  X(cuDevicePrimaryCtxRelease_v2, (CUdevice dev))                                         \
  X(cuCtxSetCurrent, (CUcontext ctx))                                                     \
  X(cuMemGetInfo_v2, (size_t * free, size_t * total))                                     \
  X(cuMemAlloc_v2, (CUdeviceptr * dptr, size_t bytesize))                                 \
  X(cuMemFree_v2, (CUdeviceptr dptr))                                                     \
  X(cuMemHostAlloc, (void** pp, size_t bytesize, unsigned int Flags))                     \
  X(cuMemFreeHost, (void* p))                                                             \
  X(cuMemHostRegister_v2, (void* p, size_t bytesize, unsigned int Flags))                 \
  X(cuMemHostUnregister, (void* p))                                                       \
  X(cuMemcpyHtoD_v2, (CUdeviceptr dstDevice, const void* srcHost, size_t ByteCount))      \
  X(cuMemcpyHtoDAsync_v2,                                                                 \
    (CUdeviceptr dstDevice, const void* srcHost, size_t ByteCount, CUstream hStream))     \
  X(cuMemcpyDtoH_v2, (void* dstHost, CUdeviceptr srcDevice, size_t ByteCount))            \
  X(cuStreamCreate, (CUstream * phStream, unsigned int Flags))                            \
  X(cuStreamDestroy_v2, (CUstream hStream))                                               \
  X(cuStreamSynchronize, (CUstream hStream))                                              \
  X(cuEventCreate, (CUevent * phEvent, unsigned int Flags))                               \
  X(cuEventRecord, (CUevent hEvent, CUstream hStream))                                    \
  X(cuEventQuery, (CUevent hEvent))                                                       \
  X(cuEventSynchronize, (CUevent hEvent))                                                 \
  X(cuEventDestroy_v2, (CUevent hEvent))

// The table of functions: filled from libcuda.so.1, or from the emulated
// backend's exports, by the same loader (driver.cpp).
struct DriverApi {
#define ZEROGPU_DECLARE_POINTER(name, params) CUresult(*name) params = nullptr;
  ZEROGPU_DRIVER_FUNCTIONS(ZEROGPU_DECLARE_POINTER)
#undef ZEROGPU_DECLARE_POINTER
};

}  // namespace zerogpu
