"""The engine's hardware rule: CPU facts -> dtype, thread binding and KV block; user settings win.

Table-driven, with the flag sets of real CPUs; no engine starts here (tests/test_engine.py checks
that a real engine runs with what the rule picks).
"""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.errors import InvalidParameterValue
from engine.hardware import CpuFacts, choose_block_size, choose_dtype, choose_threads_bind, parse_cpuinfo

AVX2 = {"sse4_2", "avx", "avx2", "fma", "f16c"}
AVX512 = AVX2 | {"avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni"}


@pytest.mark.parametrize(("flags", "architecture", "dtype"), [
    (AVX2, "x86_64", "float32"),                                   # AMD EPYC (Zen 2/3), most laptops
    (AVX512, "x86_64", "float32"),                                 # Skylake/Cascade Lake Xeon: AVX-512, no bf16
    (AVX512 | {"avx512_bf16"}, "x86_64", "bfloat16"),              # Cooper Lake, AMD Zen 4
    (AVX512 | {"avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}, "x86_64", "bfloat16"),  # Sapphire Rapids (AMX)
    ({"fp", "asimd", "sve"}, "aarch64", "float32"),               # Graviton2-class ARM
    ({"fp", "asimd", "sve", "bf16", "i8mm"}, "aarch64", "bfloat16"),  # Graviton3 (BF16 extension)
    ({"avx2", "bf16"}, "x86_64", "float32"),                       # an ARM feature name means nothing on x86
])
def test_dtype_follows_native_bf16(flags, architecture, dtype):
    choice = choose_dtype(CpuFacts.for_test(flags, architecture=architecture, model_name="Some CPU"))
    assert choice.value == dtype
    assert "Some CPU" in choice.reason
    assert ("no native bf16" in choice.reason) == (dtype == "float32")


@pytest.mark.parametrize(("cores", "bind"), [(1, "0"), (2, "0-1"), (4, "0-3"), (7, "0-6"), (8, "auto"), (64, "auto")])
def test_small_machines_compute_on_every_core(cores, bind):
    assert choose_threads_bind(CpuFacts.for_test(AVX2, cores=cores)).value == bind


def test_bind_lists_gaps_as_vllm_writes_them():
    facts = CpuFacts("cpu", "x86_64", frozenset(AVX2), (0, 1, 2, 3, 4, 5), (0, 2, 4, 5))
    assert choose_threads_bind(facts).value == "0,2,4-5"


def test_block_size_is_the_smallest_cpu_attention_accepts():
    assert choose_block_size(CpuFacts.for_test(AVX2)).value == 32


def test_cpuinfo_is_read_on_x86_and_arm():
    x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse avx2 fma\n\nprocessor\t: 1\n"
    assert parse_cpuinfo(x86) == ("AMD EPYC 7B13", frozenset({"fpu", "sse", "avx2", "fma"}))
    arm = "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd evtstrm bf16 sve\nCPU implementer\t: 0x41\n"
    assert parse_cpuinfo(arm) == ("", frozenset({"fp", "asimd", "evtstrm", "bf16", "sve"}))


def test_this_machine_gets_the_rule_with_its_reason(monkeypatch):
    from engine.hardware import read_cpu_facts

    monkeypatch.delenv("SQLINFER_ENGINE_DTYPE", raising=False)
    config = EngineConfig.for_this_machine()
    expected = choose_dtype(read_cpu_facts())
    assert config.dtype == expected.value
    assert config.reasons()["dtype"] == expected.reason


def test_the_users_setting_wins_over_the_rule(monkeypatch):
    from engine.hardware import read_cpu_facts

    other = "bfloat16" if choose_dtype(read_cpu_facts()).value == "float32" else "float32"
    monkeypatch.setenv("SQLINFER_ENGINE_DTYPE", other)
    from_env = EngineConfig.for_this_machine()
    assert from_env.dtype == other and from_env.reasons()["dtype"] == "set by SQLINFER_ENGINE_DTYPE"
    in_code = EngineConfig.for_this_machine(dtype="float16")  # code beats the variable too
    assert in_code.dtype == "float16" and in_code.reasons()["dtype"] == "set in code"


def test_an_invalid_dtype_names_the_variable_and_the_allowed_values(monkeypatch):
    monkeypatch.setenv("SQLINFER_ENGINE_DTYPE", "bf16")
    with pytest.raises(InvalidParameterValue) as caught:
        EngineConfig.for_this_machine()
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
    assert "SQLINFER_ENGINE_DTYPE = 'bf16' is invalid" in caught.value.message
    assert "allowed values: float32, bfloat16, float16, auto" in caught.value.message


def test_an_exported_vllm_binding_is_left_alone(monkeypatch):
    config = EngineConfig(cpu_threads_bind="0-1")
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    assert config.process_env() == {"VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    assert config.process_env() == {}


def test_engine_args_carry_the_block_size_for_generation_only():
    config = EngineConfig(block_size=32)
    assert config.engine_args("m", "generate")["block_size"] == 32
    assert "block_size" not in config.engine_args("m", "pooling")
