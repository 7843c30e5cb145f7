"""SALT's rows in PEFT's own custom-model tests (``test_custom_models.py`` of the installed
PEFT's source distribution), added the way PEFT adds a method: to ``TEST_CASES``,
``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES``, ``MIXED_ADAPTER_TEST_CASES`` and to the inline
lists of the tests that enumerate their methods. ``conftest.py`` writes the patched copy
and runs only the tests that got a SALT row; ``EXEMPT`` lists what SALT does differently,
each with the PEFT method PEFT itself exempts from the same test.
"""

from salt_kernels.peft import SaltConfig

# (test name, model id, config class, config kwargs), as PEFT's TEST_CASES.
TEST_CASES = [
    # residual (the default): the identity at init, an update on top of the base layer
    ("Vanilla MLP 1 SALT", "MLP", SaltConfig, {"target_modules": "lin0"}),
    ("Vanilla MLP 2 SALT", "MLP", SaltConfig, {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 SALT", "MLP", SaltConfig, {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 SALT", "MLP", SaltConfig, {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 SALT", "MLP", SaltConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 SALT scale_shift", "MLP", SaltConfig, {"target_modules": ["lin0", "lin1"], "sigma_mode": "scale_shift"}),
    ("Vanilla MLP 7 SALT full rank", "MLP", SaltConfig, {"target_modules": ["lin0"], "rank": 1.0}),
    ("Vanilla MLP 8 SALT lora_rank 0", "MLP", SaltConfig, {"target_modules": ["lin0", "lin1"], "lora_rank": 0}),
    ("Vanilla MLP 9 SALT energy", "MLP", SaltConfig, {"target_modules": ["lin0"], "energy": 0.9}),
    ("Vanilla MLP 10 SALT lowrank svd", "MLP", SaltConfig, {"target_modules": ["lin0"], "rank": 4, "svd": "lowrank"}),
    ("Vanilla MLP 11 SALT store_basis", "MLP", SaltConfig, {"target_modules": ["lin0"], "store_basis": True, "scaling": 0.5}),
    ("Vanilla MLP 12 SALT exclude", "MLP", SaltConfig, {"target_modules": ["lin0", "lin1"], "exclude_modules": ["lin1"]}),
    # truncated: SALT's own layer U_r C V_r^T replaces the base layer
    ("Vanilla MLP 1 SALT truncated", "MLP", SaltConfig, {"target_modules": ["lin0"], "residual": False}),
    ("Vanilla MLP 2 SALT truncated", "MLP", SaltConfig, {"target_modules": ["lin0", "lin1"], "residual": False}),
    ("Vanilla MLP 3 SALT truncated full rank", "MLP", SaltConfig, {"target_modules": ["lin0"], "residual": False, "rank": 1.0}),
    ("Vanilla MLP 4 SALT truncated scale_shift", "MLP", SaltConfig,
     {"target_modules": ["lin0"], "residual": False, "sigma_mode": "scale_shift"}),
    ("Vanilla MLP 5 SALT truncated lora_rank 0", "MLP", SaltConfig, {"target_modules": ["lin0"], "residual": False, "lora_rank": 0}),
    # transformers' Conv1D (GPT-2: the weight is (in, out))
    ("Embedding + transformers Conv1D 1 SALT", "EmbConv1D", SaltConfig, {"target_modules": ["conv1d"]}),
    ("Embedding + transformers Conv1D 2 SALT", "EmbConv1D", SaltConfig, {"target_modules": ["conv1d", "lin0"]}),
    ("Embedding + transformers Conv1D 3 SALT truncated", "EmbConv1D", SaltConfig,
     {"target_modules": ["conv1d", "lin0"], "residual": False}),
    # nn.Conv2d (groups=1), the kernel flattened to (out, in*kh*kw)
    ("Conv2d 1 SALT", "Conv2d", SaltConfig, {"target_modules": ["conv2d"]}),
    ("Conv2d 2 SALT", "Conv2d", SaltConfig, {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 3 SALT truncated", "Conv2d", SaltConfig, {"target_modules": ["conv2d"], "residual": False}),
    ("Conv2d 4 SALT 1x1", "Conv2d1x1", SaltConfig, {"target_modules": ["conv2d"]}),
    ("Conv2d 5 SALT scale_shift", "Conv2d2", SaltConfig, {"target_modules": ["conv2d", "lin0"], "sigma_mode": "scale_shift"}),
]

# Truncated adapters replace the layer and are active one at a time, so only residual
# adapters have rows here, as LN tuning (which replaces the LayerNorm too) has none.
MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [
    ("SALT Same", "salt", SaltConfig, {"target_modules": ["lin0"], "init_weights": False},
     {"target_modules": ["lin0"], "init_weights": False}),
    ("SALT Different", "salt", SaltConfig, {"target_modules": ["lin0"], "init_weights": False},
     {"target_modules": ["lin1"], "init_weights": False}),
    ("SALT Same different ranks", "salt", SaltConfig, {"target_modules": ["lin0"], "rank": 4, "init_weights": False},
     {"target_modules": ["lin0"], "rank": 8, "lora_rank": 2, "sigma_mode": "scale_shift", "init_weights": False}),
]

MIXED_ADAPTER_TEST_CASES = [
    ("SALT mixed adapter", SaltConfig(target_modules=["lin0"], init_weights=False),
     SaltConfig(target_modules=["lin0"], rank=4, lora_rank=2, init_weights=False)),
    ("SALT mixed adapter truncated", SaltConfig(target_modules=["lin0"], residual=False, init_weights=False),
     SaltConfig(target_modules=["lin0"], sigma_mode="scale_shift", init_weights=False)),
    ("SALT mixed adapter lora_rank 0", SaltConfig(target_modules=["lin0"], lora_rank=0, init_weights=False),
     SaltConfig(target_modules=["lin0", "lin1"], scaling=0.5, init_weights=False)),
]

# Rows for the tests that list their methods inline ("Class.test": rows of that list).
_MLP = {"init_weights": False}
INLINE = {
    "TestMixedAdapterBatches.test_mixed_adapter_batches_different_target_layers": [
        ("SALT mixed adapter with different target layers", SaltConfig(target_modules=["lin0"], **_MLP),
         SaltConfig(target_modules=["lin1"], **_MLP)),
    ],
    "TestMixedAdapterBatches.test_mixed_adapter_batches_multiple_modules_to_save": [
        ("SALT mixed adapter with modules to save", SaltConfig(target_modules=["lin0"], modules_to_save=["lin1"], **_MLP),
         SaltConfig(target_modules=["lin0"], modules_to_save=["lin1"], **_MLP)),
    ],
    "TestMixedAdapterBatches.test_mixed_adapter_batches_unsupported_layer_raises": [
        ("SALT mixed adapter with unsupported layer", SaltConfig(target_modules=["lin0"], modules_to_save=["gru"], **_MLP),
         SaltConfig(target_modules=["lin0"], modules_to_save=["gru"], **_MLP)),
    ],
    "TestMixedAdapterBatches.test_mixed_adapter_batches_partly_overlapping_target_layers": [
        ("SALT mixed adapter with overlapping layers", SaltConfig(target_modules=["lin0"], **_MLP),
         SaltConfig(target_modules=["lin0", "lin1"], **_MLP)),
    ],
    "TestMixedAdapterBatches.test_mixed_adapter_batches_lora_conv1d_emb": [
        ("SALT mixed adapter with conv1d", SaltConfig(target_modules=["conv1d"], **_MLP),
         SaltConfig(target_modules=["conv1d", "lin0"], **_MLP)),
    ],
    "TestMixedAdapterBatches.test_mixed_adapter_batches_lora_conv1d_emb_multiple_modules_to_save": [
        ("SALT mixed adapter with conv1d and modules to save",
         SaltConfig(target_modules=["conv1d"], modules_to_save=["lin0"], **_MLP),
         SaltConfig(target_modules=["conv1d"], modules_to_save=["lin0"], **_MLP)),
    ],
    "TestMixedAdapterBatches.test_mixed_adapter_batches_lora_conv2d": [
        ("SALT mixed adapter with conv2d", SaltConfig(target_modules=["conv2d"], **_MLP),
         SaltConfig(target_modules=["conv2d"], rank=4, residual=False, **_MLP)),
    ],
    "TestMixedAdapterBatches.test_mixed_adapter_batches_lora_wrong_adapter_name_raises": [
        ("SALT mixed batch wrong adapter name", SaltConfig(target_modules=["lin0"], **_MLP)),
    ],
    "TestPeftCustomModel.test_multiple_adapters_mixed_modules_to_save": [SaltConfig],
    "TestPeftCustomModel.test_multiple_adapters_mixed_modules_to_save_order_switched": [SaltConfig],
    "TestPeftCustomModel.test_adapter_name_makes_no_difference": [SaltConfig(target_modules=["lin0"], **_MLP)],
    "TestDefaultTargetModules.test_default_target_modules_not_set_raises": [SaltConfig],
    "TestDefaultTargetModules.test_default_target_modules_not_set_model_type_set_raises": [SaltConfig],
    "TestDefaultTargetModules.test_default_target_modules_list_of_str": [SaltConfig],
    "TestDefaultTargetModules.test_default_target_modules_str": [SaltConfig],
}

# Where SALT differs from LoRA by design, each with its precedent: what PEFT's own tests
# do for a comparable method. (test functions, SALT rows, the exception the test ends
# with, reason); conftest.py applies them as strict xfails that must fail with that
# exception, so an exemption that stops being needed, or a different failure, fails the run.
NOT_IDENTITY_AT_INIT = (  # truncated below full rank: the layer starts as the rank-r truncation
    "Vanilla MLP 1 SALT truncated",
    "Vanilla MLP 2 SALT truncated",
    "Vanilla MLP 4 SALT truncated scale_shift",
    "Vanilla MLP 5 SALT truncated lora_rank 0",
    "Conv2d 3 SALT truncated",
)
EXEMPT = [
    (("test_disable_adapters", "test_disable_adapters_with_merging"), NOT_IDENTITY_AT_INIT, AssertionError,
     "truncated SALT below full rank is not the identity at init (it replaces W by its rank-r truncation); "
     "precedent: PEFT skips these identity-at-init checks for PaRa (DeftConfig(para=True), 'intentionally not "
     "identity-at-init') and KaSA ('destructively truncates the base weight at adapter init')"),
    (("test_loading_model_requires_grad_set_correctly", "test_loading_model_with_modules_to_save_requires_grad_set_correctly"),
     ("SaltConfig",), ValueError,
     "the test loads the adapter into a second, differently initialised DeepMLP (no seed); a SALT adapter lives in "
     "its base's singular basis and loading it onto another base is refused (docs/model-guide.md, the loading "
     "rule); precedent: the same test gives TrainableTokens, whose adapter must also fit its base, a base of its own"),
]
