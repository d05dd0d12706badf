"""What a scheduler's ``step`` returns: :class:`StepOutput`, shaped like diffusers' ``BaseOutput``, its two kinds
(:class:`TCDSchedulerOutput`, :class:`FlowMatchTCDSchedulerOutput`), and :func:`lazy_tensor`, the guarded deferred
``x̂0`` of the fused path."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

__all__ = ["FlowMatchTCDSchedulerOutput", "StepOutput", "TCDSchedulerOutput", "lazy_tensor"]


def _version(tensor: torch.Tensor) -> int | None:
    """The in-place version counter of ``tensor``; None where torch keeps none (inference-mode tensors)."""
    try:
        return int(tensor._version)
    except RuntimeError:
        return None


@functools.cache
def _cuda_available() -> bool:
    return torch.cuda.is_available()


def lazy_tensor(
    compute: Callable[[], torch.Tensor], *inputs: torch.Tensor
) -> torch.Tensor | Callable[[], torch.Tensor]:
    """``compute`` deferred until first read, guarded against the caller changing ``inputs`` in the meantime.

    The deferred value is computed from ``inputs`` later, so it would be wrong if they were modified in place first
    (a loop that writes the next latents into the same tensor). Their version counters are recorded now and checked
    on read, which raises instead. Where no change could be seen (tensors made under ``torch.inference_mode``, which
    keep no version counter, or while a CUDA graph is being captured), the value is computed now. Writes that torch
    does not count (through ``.data``, a numpy or DLPack view, a CUDA graph replay into the same memory) are not
    seen: this is used only on the opt-in ``fused_step`` path, whose docs say to read ``pred_original_sample``
    before reusing the inputs that way."""
    try:
        versions = tuple(t._version for t in inputs)
    except RuntimeError:  # inference-mode tensors keep no version counter
        return compute()
    if _cuda_available() and torch.cuda.is_current_stream_capturing():
        return compute()

    def checked() -> torch.Tensor:
        if tuple(_version(t) for t in inputs) != versions:
            raise RuntimeError(
                "pred_original_sample is computed on first read from step's inputs, which have been modified in "
                "place since; read it before changing model_output or sample (or use fused_step=False)"
            )
        return compute()

    return checked


class StepOutput(dict[str, torch.Tensor]):
    """What a scheduler's ``step`` returns, shaped like diffusers' ``BaseOutput``: an (insertion-ordered) mapping of the
    reference's fields (``keys()``, ``values()``, ``out["prev_sample"]``), indexable like its tuple form
    (``out[0]``, ``to_tuple()``, what ``step(..., return_dict=False)`` returns), each field also an attribute.

    ``pred_original_sample`` (``x̂0``) is an extra attribute, not a key (the reference's outputs have none): it can be
    read and assigned, and where the step itself did not need it, it is computed on first read."""

    #: The reference's fields: the keys and the tuple form.
    _FIELDS: ClassVar[tuple[str, ...]] = ("prev_sample", "pred_noised_sample")
    #: Further attributes, besides ``pred_original_sample``, that are not keys.
    _EXTRAS: ClassVar[tuple[str, ...]] = ()
    _x0: torch.Tensor | Callable[[], torch.Tensor] | None

    def __init__(self, *values: Any, pred_original_sample: Any = None, **named: Any) -> None:
        fields, extras = self._FIELDS, self._EXTRAS
        if len(values) == 1 and isinstance(values[0], Mapping):  # type(out)({k: v, ...}), as BaseOutput takes
            named = {**values[0], **named}
            values = ()
        if len(values) < len(fields):
            values = (*values, *(named.pop(k) for k in fields[len(values) :] if k in named))
        unknown = [k for k in named if k not in extras]
        if len(values) != len(fields) or unknown:
            given = sorted([*fields[: len(values)], *named])
            raise TypeError(f"{type(self).__name__} takes the fields {fields + extras}, got {given}")
        dict.__init__(self, zip(fields, values, strict=True))
        attributes = self.__dict__  # the fields live in the mapping only, read through __getattr__
        attributes["_x0"] = pred_original_sample
        for key in extras:
            attributes[key] = named.get(key)

    @classmethod
    def _of(cls, values: tuple[Any, ...], x0: Any, extras: tuple[Any, ...] = ()) -> Any:
        """The output of the fields ``values`` (in order), ``x0`` and the ``extras`` (in order), unchecked: the
        schedulers' own construction, a few attribute writes."""
        out = dict.__new__(cls)
        dict.__init__(out, zip(cls._FIELDS, values, strict=True))
        attributes = out.__dict__
        attributes["_x0"] = x0
        for key, value in zip(cls._EXTRAS, extras, strict=True):
            attributes[key] = value
        return out

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Register each output class as a pytree node, as diffusers does for ``BaseOutput`` (``tree_map``,
        ``send_to_device`` and DDP see the tensors inside)."""
        super().__init_subclass__(**kwargs)
        import torch.utils._pytree as pytree

        def flatten(out: StepOutput) -> tuple[list[Any], Any]:
            names = (*cls._FIELDS, *cls._EXTRAS)
            return [*(getattr(out, k) for k in names), out.__dict__["_x0"]], names

        def unflatten(values: Any, names: Any) -> StepOutput:
            *tensors, x0 = list(values)
            return cls(**dict(zip(names, tensors, strict=True)), pred_original_sample=x0)

        pytree.register_pytree_node(
            cls, flatten, unflatten, serialized_type_name=f"{cls.__module__}.{cls.__qualname__}"
        )

    def __getattr__(self, name: str) -> Any:
        if name in self._FIELDS:
            return dict.__getitem__(self, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def pred_original_sample(self) -> torch.Tensor:
        """``x̂0`` (after clipping/thresholding and the boundary condition, where configured)."""
        if callable(self._x0) and not isinstance(self._x0, torch.Tensor):
            self.__dict__["_x0"] = self._x0()
        return self._x0  # type: ignore[return-value]

    @pred_original_sample.setter
    def pred_original_sample(self, value: torch.Tensor) -> None:
        self.__dict__["_x0"] = value

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._FIELDS:
            dict.__setitem__(self, name, value)
        elif name == "pred_original_sample":
            self.__dict__["_x0"] = value
        else:  # further attributes, as on diffusers' outputs (InvokeAI sets ``denoised`` on some)
            self.__dict__[name] = value

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self._FIELDS:
            raise KeyError(f"{type(self).__name__} has no field {key!r}; its fields are {self._FIELDS}")
        dict.__setitem__(self, key, value)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return dict.__getitem__(self, key)
        return self.to_tuple()[key]

    def _frozen(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"the fields of a {type(self).__name__} can be assigned, not added or removed")

    __delitem__ = pop = popitem = setdefault = update = clear = _frozen

    def to_tuple(self) -> tuple[torch.Tensor, ...]:
        """The tuple form of the output (the values of ``keys()``)."""
        return tuple(dict.__getitem__(self, k) for k in self._FIELDS)

    def __reduce__(self) -> Any:
        extras = {k: v for k, v in self.__dict__.items() if k != "_x0"}
        x0: Any
        try:
            x0 = self.pred_original_sample
        except RuntimeError:  # its inputs changed since the step: the copy raises too, when read
            x0 = _STALE
        return (_rebuild_output, (type(self), self.to_tuple(), x0, extras))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self._FIELDS)}; {', '.join((*self._EXTRAS, 'pred_original_sample'))})"


class _StaleX0:
    """The deferred ``x̂0`` of a copied output whose inputs had changed: reading it raises, as on the original."""

    def __call__(self) -> torch.Tensor:
        raise RuntimeError(
            "pred_original_sample of this copied step output was deferred, and the step's inputs were modified in "
            "place before the copy; read it before changing model_output or sample"
        )


_STALE = _StaleX0()


def _rebuild_output(
    cls: type[StepOutput], values: tuple[torch.Tensor, ...], x0: Any, attributes: dict[str, Any]
) -> StepOutput:
    out = cls(*values, pred_original_sample=x0, **{k: v for k, v in attributes.items() if k in cls._EXTRAS})
    for key, value in attributes.items():
        if key not in cls._EXTRAS:
            out.__dict__[key] = value
    return out


class TCDSchedulerOutput(StepOutput):
    """Output of :meth:`TCDScheduler.step`.

    Attributes:
        prev_sample: ``x_t'``, the input of the next model call, shape of the sample.
        pred_noised_sample: ``x_s``, the denoised estimate carried to time ``s``.
        pred_original_sample: ``x̂0`` after clipping/thresholding. With ``fused_step`` it is computed when first read,
            which raises if ``model_output`` or ``sample`` were changed in place since (read it before reusing them
            through ``.data``, numpy views or CUDA graph replays, which torch does not count).

    As diffusers' ``TCDSchedulerOutput``: a mapping whose keys are ``prev_sample`` and ``pred_noised_sample``, and
    whose tuple form (``to_tuple()``, ``out[0]``, ``step(..., return_dict=False)``) is the pair of them;
    ``pred_original_sample`` is an extra attribute (readable and assignable, as InvokeAI's inpainting does).
    """


class FlowMatchTCDSchedulerOutput(StepOutput):
    """Output of :meth:`FlowMatchTCDScheduler.step`.

    Attributes:
        prev_sample: the next model input, ``x`` at the next sigma.
        pred_noised_sample: ``x_s``, the denoised estimate carried to ``σ_s = (1 − γ)·σ_next``.
        pred_original_sample: ``x̂0 = x − σ·u``.

    As diffusers' flow schedulers, its one key and its tuple form (``return_dict=False``) are ``prev_sample``; the
    other two are attributes.
    """

    _FIELDS = ("prev_sample",)
    _EXTRAS = ("pred_noised_sample",)
