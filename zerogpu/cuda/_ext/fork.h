// Forking a multi-threaded Python process without inheriting a lock held by another thread.
#pragma once

#include <cstdint>
#include <vector>

namespace zerogpu {

// Forks like os.fork(), but holds the given pthread mutexes across fork(2):
// each is locked after the interpreter's before-fork hooks, with the GIL held,
// and unlocked again in the parent and in the child right after. Returns the
// child's pid in the parent and 0 in the child; throws nanobind::python_error
// if fork(2) fails.
long fork_holding(const std::vector<std::uintptr_t>& mutexes);

}  // namespace zerogpu
