#include "fork.h"

#include <Python.h>
#include <pthread.h>
#include <unistd.h>

#include <cerrno>

#include <nanobind/nanobind.h>

namespace zerogpu {

long fork_holding(const std::vector<std::uintptr_t>& mutexes) {
  // What os.fork() does (CPython's posixmodule.c), plus the mutexes. Other
  // threads vanish at a fork, but a mutex one of them held stays locked in
  // the child forever. Locking each one here, after the before-fork hooks
  // (which may run Python code and hand the GIL around), cannot deadlock: a
  // thread holding one of these mutexes runs without the GIL (torch releases
  // it around its kernels) and lets go without needing it, and no thread can
  // start waiting for one while holding the GIL, since this thread has it.
  if (PySys_Audit("os.fork", nullptr) < 0) throw nanobind::python_error();
  PyOS_BeforeFork();
  for (std::uintptr_t address : mutexes) pthread_mutex_lock(reinterpret_cast<pthread_mutex_t*>(address));
  pid_t pid = fork();
  int saved_errno = errno;
  // In the child the locks belong to its one thread, the one that forked.
  for (auto it = mutexes.rbegin(); it != mutexes.rend(); ++it)
    pthread_mutex_unlock(reinterpret_cast<pthread_mutex_t*>(*it));
  if (pid == 0) {
    PyOS_AfterFork_Child();
  } else {
    PyOS_AfterFork_Parent();
  }
  if (pid < 0) {
    errno = saved_errno;
    PyErr_SetFromErrno(PyExc_OSError);
    throw nanobind::python_error();
  }
  return pid;
}

}  // namespace zerogpu
