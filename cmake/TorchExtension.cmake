# The Python extension module hivemind_backend._C: csrc/torch/*.cpp + hivemind_core.
# The only target that sees torch headers. Why it is linked this way: docs/building.md.

find_package(Python3 REQUIRED COMPONENTS Interpreter Development.Module)

# torch's CMake package lives inside the installed wheel.
if(NOT Torch_DIR)
  execute_process(
    COMMAND "${Python3_EXECUTABLE}" -c "import torch.utils; print(torch.utils.cmake_prefix_path)"
    OUTPUT_VARIABLE HIVEMIND_TORCH_PREFIX OUTPUT_STRIP_TRAILING_WHITESPACE
    RESULT_VARIABLE HIVEMIND_TORCH_FOUND)
  if(NOT HIVEMIND_TORCH_FOUND EQUAL 0)
    message(FATAL_ERROR "${Python3_EXECUTABLE} cannot import torch; run `make setup` first")
  endif()
  list(APPEND CMAKE_PREFIX_PATH "${HIVEMIND_TORCH_PREFIX}")
endif()
find_package(Torch REQUIRED)
# The CPU wheel has MKL inside libtorch_cpu; without MKL_ROOT, caffe2::mkl only adds bogus
# -L/-rpath entries (/lib/intel64 ...).
if(TARGET caffe2::mkl AND NOT MKL_ROOT)
  set_property(TARGET caffe2::mkl PROPERTY INTERFACE_LINK_DIRECTORIES "")
endif()
# TorchConfig links libtorch but not the Python bindings, which pybind11 code needs.
find_library(TORCH_PYTHON_LIBRARY torch_python REQUIRED
             PATHS "${TORCH_INSTALL_PREFIX}/lib" NO_DEFAULT_PATH)

file(GLOB HIVEMIND_TORCH_SOURCES CONFIGURE_DEPENDS "${PROJECT_SOURCE_DIR}/csrc/torch/*.cpp")
python3_add_library(_C MODULE WITH_SOABI ${HIVEMIND_TORCH_SOURCES})
# Debian's libprotobuf/libzmq/libsodium are listed before libtorch* so that they come first in
# DT_NEEDED order, hence in this module's symbol lookup scope.
target_link_libraries(_C PRIVATE hivemind_core protobuf::libprotobuf hivemind::zmq hivemind::sodium
                                 torch "${TORCH_PYTHON_LIBRARY}")
target_compile_definitions(_C PRIVATE TORCH_EXTENSION_NAME=_C)
target_compile_options(_C PRIVATE ${HIVEMIND_WARNINGS})
# torch 2.13 headers need C++20 (its CMake target also asks for it); the core stays C++17.
set_target_properties(_C PROPERTIES CXX_STANDARD 20
                                    CXX_VISIBILITY_PRESET hidden
                                    VISIBILITY_INLINES_HIDDEN ON
                                    LIBRARY_OUTPUT_DIRECTORY "${PROJECT_BINARY_DIR}/hivemind_backend")
# Symbols from static archives (hivemind_core) stay local to the module; only PyInit__C is exported.
target_link_options(_C PRIVATE "LINKER:--exclude-libs,ALL")
