// An empty Python module: `import torchiter._C` loads this library, whose
// static initialisers register the ops. Kept apart from the op sources so the
// C++ build (examples/cpp) links the ops without libpython.
#include <Python.h>

// PyMODINIT_FUNC exports the symbol despite -fvisibility=hidden.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
