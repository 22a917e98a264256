#include <nanobind/nanobind.h>
namespace nb = nanobind;
NB_MODULE(_engine, m) {
  m.def("version", []() { return 1; });
}
