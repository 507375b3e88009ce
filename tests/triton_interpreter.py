"""Running Triton kernels in its CPU interpreter from a test: a fresh process (the interpreter must be
switched on before Triton loads) whose script starts with PATCH."""

PATCH = """
import triton.runtime.interpreter as interpreter
original = interpreter._patch_lang_tensor
def patched(tensor, scope):  # NumPy >= 2.4 refuses int() of the interpreter's 1-element scalars
    original(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
interpreter._patch_lang_tensor = patched
"""
