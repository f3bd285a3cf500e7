"""oneDNN linear layers (spinlm.model.kernels) against nn.Linear."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import copy

import pytest
import torch
from torch import nn

from spinlm.model.kernels import OneDNNLinear, onednn_available, use_onednn_linears
from spinlm.model.tiny import build_tiny_model

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN")


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_equal_nn_linear(bias):
    torch.manual_seed(0)
    ref = nn.Linear(48, 80, bias=bias)
    fast = copy.deepcopy(ref)
    use_onednn_linears(fast, "onednn")
    assert type(fast) is OneDNNLinear
    x = torch.randn(3, 7, 48, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    grad = torch.randn(3, 7, 80)
    ref(x).backward(grad)
    y = fast(x2)
    y.backward(grad)
    torch.testing.assert_close(y, ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x2.grad, x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-5)
    if bias:
        torch.testing.assert_close(fast.bias.grad, ref.bias.grad, atol=1e-5, rtol=1e-5)


def test_other_dtypes_and_autocast_take_the_usual_path():
    layer = nn.Linear(16, 8)
    use_onednn_linears(layer, "onednn")
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    assert layer.double()(x.double()).dtype == torch.float64
    assert layer.float()(torch.randn(0, 16)).shape == (0, 8)


def test_modes_on_a_model(tokenizer):
    model = build_tiny_model(tokenizer, seed=0)
    keys = set(model.state_dict())
    assert use_onednn_linears(copy.deepcopy(model), "default") == 0
    fast = copy.deepcopy(model)
    n = use_onednn_linears(fast, "onednn")
    assert n == sum(isinstance(m, nn.Linear) for m in model.modules()) and n > 0
    assert set(fast.state_dict()) == keys
    ids = torch.randint(0, len(tokenizer), (2, 12))
    loss_ref = model(input_ids=ids, labels=ids).loss
    loss_fast = fast(input_ids=ids, labels=ids).loss
    loss_ref.backward()
    loss_fast.backward()
    torch.testing.assert_close(loss_fast, loss_ref, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(model.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="cpu_linear_kernel"):
        use_onednn_linears(model, "mkl")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_loaded_models_give_the_lm_head_a_contiguous_input(tiny_model_dir, tokenizer, dtype):
    """Decoding's last-position logits (logits_to_keep=1) slice the hidden states; a strided bf16 input makes
    PyTorch's CPU matmul expand the head's weight per row (hundreds of MiB on a real vocabulary)."""
    from spinlm.model.loading import load_model

    model = load_model(tiny_model_dir, tokenizer, dtype)
    seen = []
    model.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    ids = torch.randint(0, len(tokenizer), (3, 7))
    with torch.no_grad():
        last = model(input_ids=ids, logits_to_keep=1).logits
        full = model(input_ids=ids).logits
    assert seen == [True, True]
    torch.testing.assert_close(last[:, -1], full[:, -1], atol=0, rtol=0)
