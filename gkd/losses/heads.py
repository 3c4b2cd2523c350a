"""What the fused loss needs from a model: its final hidden states (the LM head's input), read with a
forward hook on its decoder, and its LM head; and the probe that decides, by evaluation, whether the
model's logits are that head applied to those hidden states (and nothing more)."""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F

PROBE_TOKENS = 8
PROBE_LOGIT = 64.0  # the second probe scales the hidden state so that logits reach about this size


def base_model(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lm_head_of(model):
    return base_model(model).get_output_embeddings()


def decoder_of(model):
    """The module whose output the LM head reads (transformers' get_decoder(): LlamaModel inside
    LlamaForCausalLM, the language model inside a vision-language model)."""
    base = base_model(model)
    if not hasattr(base, "get_decoder"):
        return None
    try:
        decoder = base.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    return decoder if decoder is not base else None


def _first(output):
    return output if isinstance(output, torch.Tensor) else output[0]


def _with_first(output, value):
    if isinstance(output, torch.Tensor):
        return value
    if isinstance(output, tuple):
        return (value, *output[1:])
    output[next(iter(output.keys()))] = value  # a ModelOutput: last_hidden_state comes first
    return output


class LastHiddenState:
    """Set by last_hidden_state(): .value, the decoder's output of the latest forward."""

    def __init__(self):
        self.value, self.calls = None, 0


@contextlib.contextmanager
def last_hidden_state(model, transform=None):
    """Capture the final hidden states of the forwards run inside the block, and nothing else: the
    model need not keep every layer's hidden states (output_hidden_states=True) for the last one.

    model: the transformers model, peft-wrapped or not, and not a DDP/DeepSpeed wrapper: the hook
    sits on its decoder, so the block may call the wrapper (which must see its forward called).
    transform (optional): replaces the decoder's output on its way to the LM head (the probe's use).
    """
    decoder = decoder_of(model)
    if decoder is None:
        raise ValueError(f"{type(base_model(model)).__name__} has no decoder module (get_decoder()) to read "
                         "its final hidden states from")
    captured = LastHiddenState()

    def hook(module, args, output):
        hidden = _first(output)
        if transform is not None:
            hidden = transform(hidden)
            output = _with_first(output, hidden)
        captured.value, captured.calls = hidden, captured.calls + 1
        return output if transform is not None else None

    handle = decoder.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def _tolerance(*dtypes: torch.dtype) -> float:
    """Relative to the largest logit: 2 units in the last place of the coarsest dtype, but no less
    than TF32's (float32 GEMMs may run in TF32 on GPUs). A multiplier further than this from 1
    shows, and so does a soft-cap at the enlarged probe's logits."""
    return 2 * max(*(torch.finfo(dtype).eps for dtype in dtypes), 2.0**-10)


def probe_head(model, vocab_size: int) -> str | None:
    """None when the model's logits are its LM head applied to its decoder's output, else why not.

    Evaluated, not read from the config (a config may name a transform the forward never applies,
    or apply one under a name nobody thought of): forward passes with logits_to_keep=1 on a few
    token ids, and the model's own last-position logits are compared with F.linear(last hidden
    state, head weight, head bias), which is what the fused loss computes. Twice: as the decoder
    leaves it, and with the hidden state scaled so that logits reach about PROBE_LOGIT, where a
    soft-cap (tanh) or a multiplier shows even if the model's logits are small at this point.
    """
    base = base_model(model)
    head = lm_head_of(model)
    if type(head) is not torch.nn.Linear:
        return f"{type(base).__name__}'s LM head is a {type(head).__name__}, not a plain Linear layer"
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}.forward has no logits_to_keep argument to skip its own LM head"
    if decoder_of(model) is None:
        return f"{type(base).__name__} has no decoder module (get_decoder()) to read its final hidden states from"
    weight, bias = head.weight, head.bias
    ids = torch.linspace(0, vocab_size - 1, PROBE_TOKENS, device=weight.device).long()[None]

    def enlarge(hidden):
        size = F.linear(hidden[:, -1:], weight).abs().amax()
        return hidden * (PROBE_LOGIT / size) if size > 0 else hidden

    was_training = model.training
    model.eval()
    try:
        for transform in (None, enlarge):
            with torch.no_grad(), last_hidden_state(model, transform) as hidden:
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False,
                               logits_to_keep=1).logits
            if hidden.calls != 1:
                return f"{type(base).__name__}'s decoder ran {hidden.calls} times in one forward"
            with torch.no_grad():
                ours = F.linear(hidden.value[:, -1:], weight, bias)[:, -1, :vocab_size].float()
            theirs = logits[:, -1, :vocab_size].float()
            error, size = (theirs - ours).abs().max().item(), theirs.abs().max().item()
            if not error <= _tolerance(hidden.value.dtype, weight.dtype, logits.dtype) * size:
                return (f"{type(base).__name__} rescales or caps its logits after the LM head: its logits differ "
                        f"from lm_head(last hidden state) by up to {error:.3g} at logits up to {size:.3g}")
    except Exception as error:  # noqa: BLE001 - a model the probe cannot run is not fused
        return f"{type(base).__name__}: the probe forward failed ({type(error).__name__}: {error})".replace("\n", " ")
    finally:
        model.train(was_training)
    return None
