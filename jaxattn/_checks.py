"""Argument checks shared by every public function and constructor.

Each helper takes the public function's name `fn` and the argument's `name`
and raises in the house style: `fn: name must ...; got ...` (ValueError for
shapes and values, TypeError for types and dtypes). Only jax and numpy are
imported, so any module may use this one.
"""

from __future__ import annotations

import functools
import math
import numbers
import types

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np


def fmt(shape) -> str:
  """A shape as `(2, 5, 6)` (ints, also for numpy ints and 1-tuples)."""
  shape = tuple(int(s) for s in shape)
  return str(shape)


def dims(shape) -> str:
  """A shape as `(2, 5, 6)`, a 1-tuple as `(2)`: sizes in error messages."""
  return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def is_int(value) -> bool:
  """A Python or NumPy integer (not a bool, not an array)."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def positive_int(fn: str, name: str, value) -> int:
  """`value` as an int > 0."""
  if not is_int(value) or value <= 0:
    raise ValueError(f"{fn}: {name} must be a positive int; got {value!r}.")
  return int(value)


def non_negative_int(fn: str, name: str, value) -> int:
  """`value` as an int >= 0."""
  if not is_int(value) or value < 0:
    raise ValueError(f"{fn}: {name} must be a non-negative int; got {value!r}.")
  return int(value)


def int_value(fn: str, name: str, value) -> int:
  """`value` as an int (any sign)."""
  if not is_int(value):
    raise ValueError(f"{fn}: {name} must be an int; got {value!r}.")
  return int(value)


def block_sizes(fn: str, value, *, optional: bool = True):
  """block_sizes: a tuple of two positive ints (not bools), or None where `optional`."""
  if value is None and optional:
    return None
  if not (isinstance(value, tuple) and len(value) == 2 and all(is_int(b) and b > 0 for b in value)):
    raise ValueError(f"{fn}: block_sizes must be a tuple of two positive ints; got {value!r}.")
  return int(value[0]), int(value[1])


def window_side(fn: str, name: str, value) -> int | None:
  """A window side: None (unbounded) or an int >= 0."""
  if value is None:
    return None
  return non_negative_int(fn, name, value)


def static_float(fn: str, name: str, value) -> float:
  """`value` as a Python float: a number or 0-d array, not traced (a named error otherwise)."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError(f"{fn}: {name} must be a static Python number; got a traced value.")
  if isinstance(value, jax.Array):
    value = np.asarray(value)
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.number,
                                                                   np.ndarray)):
    raise TypeError(f"{fn}: {name} must be a number; got {type(value).__name__}.")
  if np.ndim(value) != 0:
    raise ValueError(f"{fn}: {name} must be a scalar; got shape {fmt(np.shape(value))}.")
  return float(value)


def finite_float(fn: str, name: str, value) -> float:
  """`value` as a finite float."""
  value = static_float(fn, name, value)
  if not math.isfinite(value):
    raise ValueError(f"{fn}: {name} must be finite; got {value}.")
  return value


def finite_positive_float(fn: str, name: str, value) -> float:
  """`value` as a finite float > 0."""
  value = static_float(fn, name, value)
  if not (math.isfinite(value) and value > 0):
    raise ValueError(f"{fn}: {name} must be a finite positive number; got {value}.")
  return value


def float_dtype(fn: str, name: str, dtype) -> np.dtype:
  """`dtype` as a real floating point numpy dtype (float16, bfloat16, float32, ...)."""
  try:
    dtype = np.dtype(dtype)
  except TypeError:
    raise TypeError(f"{fn}: {name} must be a floating point dtype; got {dtype!r}.") from None
  if not jax.numpy.issubdtype(dtype, jax.numpy.floating):   # bfloat16 too
    raise TypeError(f"{fn}: {name} must be a floating point dtype; got {dtype}.")
  return dtype


def concrete(x):
  """`x` as a NumPy array when its value is known now (outside jit), else None.

  Lets a public function refuse bad values it can see (lengths, page ids)
  eagerly, while the traced path masks them instead.
  """
  if x is None:
    return None
  try:
    return np.asarray(x)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return None


def callable_name(f) -> str:
  """A user function's name for messages: `name`, else its repr."""
  name = getattr(f, "__name__", None)
  return name if isinstance(name, str) else repr(f)


def concrete_sizes(*dims) -> bool:
  """Whether every size is a concrete int (not a `jax.export` symbolic dimension)."""
  return all(isinstance(d, (int, np.integer)) for d in dims)


def segments_as_int32(q_ids, kv_ids, every=None):
  """int32 ids with the same equalities and order as the caller's.

  Ids that do not fit int32 (int64, uint32, uint64) are replaced by their rank
  among all ids of the call, which keeps which documents are equal (the mask)
  and their order (block classification) where a cast would merge
  documents whose ids differ only above bit 31. `every(ids)`, when given,
  returns the ids the ranks are taken among (ring attention: every device's).
  """
  if _fits_int32(q_ids.dtype) and _fits_int32(kv_ids.dtype):
    return q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)
  common_dt = jnp.promote_types(q_ids.dtype, kv_ids.dtype)
  q_ids, kv_ids = q_ids.astype(common_dt), kv_ids.astype(common_dt)
  every = every or (lambda x: x)
  table = jnp.sort(jnp.concatenate([every(q_ids).ravel(), every(kv_ids).ravel()]))
  rank = lambda x: jnp.searchsorted(table, x, side="left").astype(jnp.int32)
  return rank(q_ids), rank(kv_ids)


_EMPTY = object()  # an empty closure cell in a function template


class _Param(int):
  """A template slot: the index of a lifted value in the params."""


def _traced_tree(value) -> bool:
  """A pytree of arrays, one of them traced (a jit/grad tracer)."""
  leaves = _leaves(value)
  return (bool(leaves) and all(isinstance(x, (jax.Array, np.ndarray)) for x in leaves)
          and any(isinstance(x, jax.core.Tracer) for x in leaves))


def _leaves(value) -> list:
  """`value`'s pytree leaves; [value] where JAX cannot flatten it (a dict with
  keys of mixed types)."""
  try:
    return jax.tree_util.tree_leaves(value)
  except Exception:  # noqa: BLE001
    return [value]


_SCALARS = (bool, int, float, complex, str, bytes, type(None))
_KEPT = (types.FunctionType, types.BuiltinFunctionType, types.ModuleType, type, types.CodeType)


def _key(item, depth: int = 0):
  """What template equality compares, taken when the template is made: slots
  and templates by content; Python scalars by value; short tuples, lists and
  dicts by their items (a snapshot: mutated later, a new template differs);
  functions, modules, classes and the empty cell by identity (the template
  keeps them alive); anything else (arrays, objects, whose contents may
  change) never equal, so jit traces again rather than reuse stale code."""
  if isinstance(item, _Param):
    return ("param", int(item))
  if isinstance(item, _TEMPLATES):
    return item.key
  if type(item) in _SCALARS:
    return ("value", type(item), item)
  if isinstance(item, _KEPT) or item is _EMPTY:
    return ("id", id(item))
  if type(item) in (tuple, list, dict) and len(item) <= 64 and depth < 8:
    items = item.items() if type(item) is dict else enumerate(item)
    return (type(item),) + tuple((_key(k, depth + 1), _key(v, depth + 1)) for k, v in items)
  return ("unique", object())


def _build(item, params):
  if isinstance(item, _Param):
    return params[item]
  if isinstance(item, _TEMPLATES):
    return item.build(params)
  return item


class _FunctionTemplate:
  """A Python function with some closure cells or defaults replaced by slots
  (or by templates of functions they hold): code, globals and the other
  cells' contents, not the function itself (whose closure holds tracers)."""

  def __init__(self, fn, cells, defaults, kwdefaults):
    self.code, self.globals, self.name = fn.__code__, fn.__globals__, fn.__name__
    self.cells, self.defaults, self.kwdefaults = cells, defaults, kwdefaults
    self.key = ("function", self.code, id(self.globals), _key(cells), _key(defaults),
                _key(kwdefaults))

  def build(self, params):
    cells = tuple(types.CellType() if c is _EMPTY else types.CellType(_build(c, params))
                  for c in self.cells)
    defaults = None if self.defaults is None else tuple(_build(d, params) for d in self.defaults)
    f = types.FunctionType(self.code, self.globals, self.name, defaults, cells or None)
    if self.kwdefaults is not None:
      f.__kwdefaults__ = {k: _build(v, params) for k, v in self.kwdefaults.items()}
    return f


class _PartialTemplate:
  """A functools.partial with some arguments (or its function) templated."""

  def __init__(self, func, args, keywords):
    self.func, self.args, self.keywords = func, args, keywords
    self.key = ("partial", _key(func), _key(args), _key(keywords))

  def build(self, params):
    return functools.partial(_build(self.func, params), *(_build(a, params) for a in self.args),
                             **{k: _build(v, params) for k, v in self.keywords.items()})


class _MethodTemplate:
  """A bound method whose function or object is templated."""

  def __init__(self, func, obj):
    self.func, self.obj = func, obj
    self.key = ("method", _key(func), _key(obj))

  def build(self, params):
    return types.MethodType(_build(self.func, params), _build(self.obj, params))


class _ObjectTemplate:
  """An object with some fields templated: a plain dict (keys in their order),
  a registered pytree (a list, tuple, namedtuple, an equinox module, a flax
  struct dataclass) by its leaves, or another object by the attributes in its
  `__dict__`, rebuilt with `cls.__new__(cls)` and those attributes (no
  `__init__`, no copy of the original, which holds the tracers)."""

  def __init__(self, kind, spec, fields):
    self.kind, self.spec, self.fields = kind, spec, fields
    self.name = getattr(spec, "__name__", kind)
    # Tagged apart: a PyTreeDef compared with anything but a PyTreeDef raises.
    self.key = (kind, spec if kind == "pytree" else id(spec), _key(fields))

  def build(self, params):
    if self.kind == "pytree":
      return self.spec.unflatten([_build(f, params) for f in self.fields])
    if self.kind == "dict":
      return {k: _build(v, params) for k, v in self.fields.items()}
    obj = self.spec.__new__(self.spec)
    for name, value in self.fields.items():
      object.__setattr__(obj, name, _build(value, params))
    return obj


_TEMPLATES = (_FunctionTemplate, _PartialTemplate, _MethodTemplate, _ObjectTemplate)


def _liftable(value) -> bool:
  """A function, partial, bound method or callable object `_template` looks into."""
  if isinstance(value, (types.FunctionType, types.MethodType)) or type(value) is functools.partial:
    return True
  if isinstance(value, functools.partial):  # a subclass may call differently
    return False
  # A callable object whose class defines __call__ in Python: not a class, a
  # module, a builtin or a compiled function object (a jitted function).
  if isinstance(value, type) or isinstance(value, (Rebound, WithLifted, Hoisted)):
    return False  # (jaxattn's own: already lifted)
  for cls in type(value).__mro__:
    if "__call__" in vars(cls):
      return isinstance(vars(cls)["__call__"], types.FunctionType)
  return False


def _slotted(cls) -> bool:
  """Whether instances keep state outside `__dict__` (non-empty `__slots__`)."""
  return any(set(vars(c).get("__slots__", ())) - {"__dict__", "__weakref__"}
             for c in cls.__mro__ if "__slots__" in vars(c))


def _object_template(obj, lift):
  """`obj` templated (see `_ObjectTemplate`) with `lift` applied to its items,
  leaves or attributes, or None when it cannot be taken apart safely: state
  outside `__dict__` (`__slots__`, a builtin base such as dict) or a class
  that `cls.__new__(cls)` cannot make."""
  if type(obj) is dict:
    return _ObjectTemplate("dict", dict, {k: lift(v) for k, v in obj.items()})
  try:
    leaves, treedef = jax.tree_util.tree_flatten(obj)
  except Exception:  # noqa: BLE001
    return None
  if not (len(leaves) == 1 and leaves[0] is obj):
    return _ObjectTemplate("pytree", treedef, tuple(lift(x) for x in leaves))
  cls = type(obj)
  if (not isinstance(getattr(obj, "__dict__", None), dict) or _slotted(cls)
      or any(c.__module__ == "builtins" for c in cls.__mro__ if c is not object)):
    return None
  try:
    cls.__new__(cls)
  except Exception:  # noqa: BLE001
    return None
  return _ObjectTemplate("object", cls, {k: lift(v) for k, v in vars(obj).items()})


_BUSY = object()  # in memo: being templated (a cycle leaves it as it is)


def _memoized(value, memo: dict, make):
  """make()'s template for `value`, once per object: met again (a helper two
  closures share), the same template; met inside itself (recursion), None."""
  got = memo.get(id(value))
  if got is not None:
    return None if got is _BUSY else got[0]
  memo[id(value)] = _BUSY
  t = make()
  memo[id(value)] = (t, value)  # the value kept alive, so its id is not reused
  return t


def _template(fn, params: list, memo: dict):
  """`fn`'s template with every traced value it holds (appended to `params`)
  replaced by a slot, or None when it holds none."""
  return _memoized(fn, memo, lambda: _make_template(fn, params, memo))


def _make_template(fn, params: list, memo: dict):
  lifted = []  # whether anything in fn was replaced (a slot, or a template)

  def lift(value):
    out = _lift(value)
    if out is not value:
      lifted.append(True)
    return out

  def _lift(value):
    if _traced_tree(value):
      got = memo.get(id(value))
      if got is None:
        params.append(value)
        got = memo[id(value)] = (_Param(len(params) - 1), value)
      return got[0]
    if _liftable(value):
      t = _template(value, params, memo)
      return value if t is None else t
    leaves = _leaves(value)
    if (any(isinstance(x, jax.core.Tracer) for x in leaves)
        and not (len(leaves) == 1 and leaves[0] is value)):
      # A container of traced arrays and other values ({"n": n, "offset": 0}):
      # leaf by leaf, so the other values stay Python values.
      t = _memoized(value, memo, lambda: _object_template(value, lift))
      return value if t is None else t
    return value

  t: _FunctionTemplate | _PartialTemplate | _MethodTemplate | _ObjectTemplate | None
  if isinstance(fn, types.MethodType):
    obj = fn.__self__
    obj_t = _memoized(obj, memo, lambda: _object_template(obj, lift))
    t = _MethodTemplate(lift(fn.__func__), obj if obj_t is None else obj_t)
  elif not isinstance(fn, (types.FunctionType, functools.partial)):
    # A callable object: its leaves or attributes, one level deep (functions,
    # methods and callable objects among them are looked into as above).
    t = _object_template(fn, lift)
  elif isinstance(fn, functools.partial):
    t = _PartialTemplate(lift(fn.func), tuple(lift(a) for a in fn.args),
                         {k: lift(v) for k, v in fn.keywords.items()})
  else:
    cells = []
    for cell in fn.__closure__ or ():
      try:
        value = cell.cell_contents
      except ValueError:  # an empty cell (a name not yet bound)
        cells.append(_EMPTY)
        continue
      cells.append(lift(value))
    defaults = None if fn.__defaults__ is None else tuple(lift(d) for d in fn.__defaults__)
    kwdefaults = (None if fn.__kwdefaults__ is None
                  else {k: lift(v) for k, v in fn.__kwdefaults__.items()})
    t = _FunctionTemplate(fn, tuple(cells), defaults, kwdefaults)
  return t if t is not None and lifted else None


class Rebound:
  """A user function whose traced values come from `params` at each call.

  Made by `lift_traced_closure`; called as `Rebound(params, *args)`. It keeps
  a template of the function (code, globals, defaults, the other closure
  cells' contents; for a partial its other arguments), not the function,
  whose closure still refers to the tracers: nothing traced stays in static
  metadata (jit caches). Two are equal when their templates' keys are (see
  `_key`): a lambda re-created on every call reuses compiled code when what
  else it holds is the same functions and equal Python scalars; an array or
  another object in it makes every Rebound new.
  """

  def __init__(self, template):
    self.template = template
    self.__name__ = getattr(template, "name", "partial")

  def __eq__(self, other):
    return isinstance(other, Rebound) and self.template.key == other.template.key

  def __hash__(self):
    return hash(self.template.key)

  def __call__(self, params, *args):
    return self.template.build(params)(*args)


def lift_traced_closure(fn):
  """(Rebound, params) when `fn` holds traced arrays, else None.

  A mask or score function that closes over a value traced by an enclosing
  `jax.jit` (per-batch lengths, say) would carry that tracer into a custom
  VJP's backward as a constant, which JAX cannot lower. The traced values it
  holds (pytrees of arrays, one of them traced) become the params: in its
  closure cells and default arguments, in a `functools.partial`'s arguments,
  in a bound method's object and a callable object (a registered pytree's
  leaves, e.g. an equinox module; another object's `__dict__` attributes, one
  level deep), and in those of the functions, partials, methods and callable
  objects these hold, recursively (a nested helper it calls). Every other
  value (concrete arrays too, which the function may use in Python) stays as
  it is. Module globals and values nested inside other objects are not
  inspected.
  """
  if not _liftable(fn):
    return None
  params: list = []
  template = _template(fn, params, {})
  if template is None:
    return None
  return Rebound(template), tuple(params)


class WithLifted:
  """A function taking its own params first, `fn(params, *args)`, whose closure's
  traced values were lifted (`lift_traced_closure` gave `rebound`): called as
  `WithLifted((params, lifted), *args)`. Equal when the Rebounds are."""

  def __init__(self, rebound: Rebound):
    self.rebound, self.__name__ = rebound, rebound.__name__

  def __eq__(self, other):
    return isinstance(other, WithLifted) and self.rebound == other.rebound

  def __hash__(self):
    return hash(self.rebound)

  def __call__(self, params, *args):
    own, lifted = params
    return self.rebound(lifted, own, *args)


def lift_traced_closure_with_params(fn, params):
  """`lift_traced_closure` for a function that takes params first: (WithLifted,
  (params, lifted)) when it holds traced arrays, else None."""
  lifted = lift_traced_closure(fn)
  if lifted is None:
    return None
  rebound, lifted_params = lifted
  return WithLifted(rebound), (params, lifted_params)


class Hoisted:
  """A user function whose traced constants, found by tracing it, come from params.

  Made by `hoist_traced_constants`, for what `lift_traced_closure`'s templates
  cannot reach (module globals, `__slots__` objects, objects in a cycle, a
  recursive function, values nested deeper). Called as
  `Hoisted((own_params, values), *args)`: each call traces the function at
  its arguments' shapes (`jax.make_jaxpr`), puts `values` in place of the
  traced constants found when it was made (matched by identity), and
  evaluates the result (`jax.extend.core.jaxpr_as_fun`). Equal only to itself:
  it holds the function, whose closure holds those tracers.
  """

  def __init__(self, fn, takes_params: bool, hoisted, name: str):
    self.fn, self.takes_params, self.__name__ = fn, takes_params, name
    # The tracers are held, so that their ids stay theirs while this lives.
    self._hoisted = tuple(hoisted)
    self._slots = {id(x): k for k, x in enumerate(hoisted)}

  def __call__(self, params, *args):
    own, values = params
    lead = (own,) if self.takes_params else ()
    try:
      closed, shape = jax.make_jaxpr(lambda *a: self.fn(*a), return_shape=True)(*lead, *args)
    except jax.errors.UnexpectedTracerError as e:
      # A custom VJP's backward is traced after the differentiation that made
      # the value ended (newer jax refuses to touch such a tracer, even as a
      # constant to replace): only an explicit argument reaches it there.
      raise TypeError(
          f"{self.__name__} reaches a value traced by an enclosing transformation (jax.grad, "
          "jax.vmap, ...) through something "
          "jaxattn cannot rebuild (a module global, a recursive function, a __slots__ object, "
          "an object cycle, a deeper nesting), and a custom VJP's backward cannot use it: pass it with "
          "jaxattn.masks.from_function(fn, params=...) or jaxattn.scores.from_function(fn, "
          "params), or use implementation='chunked_jvp' or 'xla'.") from e
    traced = {id(c) for c in closed.consts if isinstance(c, jax.core.Tracer)}
    if traced != set(self._slots):
      # Traced again later (a custom VJP's backward is traced after the call
      # returned), the function reached other values than when it was made:
      # a global or an object it reads was changed or restored meanwhile.
      # Using them would give silently wrong gradients.
      raise TypeError(
          f"{self.__name__} read other traced values when jaxattn traced it again (as a "
          "custom VJP's backward does, after the attention call returned) than at the call: "
          "a global or an object it reads changed in between. Pass those values with "
          "jaxattn.masks.from_function(fn, params=...) or jaxattn.scores.from_function(fn, "
          "params), or use implementation='chunked_jvp' or 'xla'.")
    consts = [values[self._slots[id(c)]] if isinstance(c, jax.core.Tracer) else c
              for c in closed.consts]
    fn = jax.extend.core.jaxpr_as_fun(jax.extend.core.ClosedJaxpr(closed.jaxpr, consts))
    out = fn(*jax.tree_util.tree_leaves((*lead, *args)))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shape), out)


def holds_hoisted(tree) -> bool:
  """Whether a mask or score modifier (a pytree of them) has a `Hoisted` function."""
  hoisted = lambda m: isinstance(getattr(m, "fn", None), Hoisted) or isinstance(
      getattr(m, "block_fn", None), Hoisted)
  return tree is not None and any(hoisted(m) for m in jax.tree_util.tree_leaves(tree, is_leaf=hoisted))


def hoist_traced_constants(fn, takes_params: bool, params, example_args, name: str):
  """(Hoisted, (params, values)) when tracing `fn` at `example_args` shows
  traced values among its constants (what it closes over, however), else None.

  `fn` is called as `fn(params, *args)` when `takes_params`, else `fn(*args)`.
  A function that cannot be traced at the example shapes is left as it is
  (the caller's shape checks report it).
  """
  if isinstance(fn, Hoisted):
    return None
  lead = (params,) if takes_params else ()
  try:
    closed = jax.make_jaxpr(lambda *a: fn(*a))(*lead, *example_args)  # (fn may lack a weakref)
  except Exception:  # noqa: BLE001 (reported by the shape checks that follow)
    return None
  hoisted = list({id(c): c for c in closed.consts if isinstance(c, jax.core.Tracer)}.values())
  if not hoisted:
    return None
  return Hoisted(fn, takes_params, hoisted, name), (params, tuple(hoisted))


def _fits_int32(dtype) -> bool:
  info = np.iinfo(dtype)
  return info.min >= -2**31 and info.max <= 2**31 - 1


def host_ids_as_int32(q_ids, kv_ids):
  """Host (NumPy, list) integer ids that do not fit int32, ranked on the host.

  jax keeps 64-bit integers only with x64 on; otherwise `jnp.asarray` wraps
  them to 32 bits, merging ids that differ above bit 31 before
  `segments_as_int32` could rank them. Jax arrays and ids that fit pass
  through unchanged (kv_ids may be None).
  """
  given = [x for x in (q_ids, kv_ids) if x is not None]
  if not given or any(isinstance(x, jax.Array) for x in given):
    return q_ids, kv_ids
  host = [np.asarray(x) for x in given]
  if not all(np.issubdtype(a.dtype, np.integer) for a in host) or all(_fits_int32(a.dtype) for a in host):
    return q_ids, kv_ids
  table = np.unique(np.concatenate([a.ravel() for a in host]))
  ranked = [np.searchsorted(table, a).astype(np.int32) for a in host]
  return ranked[0], (ranked[1] if kv_ids is not None else None)
