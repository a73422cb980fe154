"""Layer 1: the traced program and THE interpreter over it (the only users of JAX's jaxpr internals)."""
from oba_jax.program.interpret import (CALLS, PLAIN_CALLS, Equation, EqnKey, Jaxpr, Rules, bind, bind_with,
                                       call_kind, equation_context, open_jaxpr, run, sub_programs, walk_into)
from oba_jax.program.trace import Program, check_param_leaves, trace_program

__all__ = ["CALLS", "PLAIN_CALLS", "Equation", "EqnKey", "Jaxpr", "Program", "Rules", "bind", "bind_with",
           "call_kind", "check_param_leaves", "equation_context", "open_jaxpr", "run", "sub_programs", "trace_program", "walk_into"]
