// One registration function per source file; module.cpp calls each of them.
// To add an op: implement `void register_<op>(pybind11::module_& m)` in its own csrc file,
// declare it here, and add one line to module.cpp.
#pragma once

#include <pybind11/pybind11.h>

namespace kfac {

void register_runtime(pybind11::module_& m);             // runtime.cpp
void register_factor_accumulate(pybind11::module_& m);   // factor_accumulate_bind.cpp
void register_precondition(pybind11::module_& m);  // precondition_bind.cpp
void register_scale_accumulate(pybind11::module_& m);  // scale_accumulate_bind.cpp
void register_conv_factor_accumulate(pybind11::module_& m);  // conv_factor_accumulate_bind.cpp

}  // namespace kfac
