import pytest

from edgecp.errors import EdgecpError
from edgecp.profiles import load_profile, parse_profile, profile_files
from edgecp.prompts import concept_prompt, expand

CONCEPTS = [{"name": "a", "token": "<a>", "class_word": "dog"}, {"name": "b", "token": "<b>", "class_word": None}]


def test_expand_adds_the_class_word_once():
    assert expand("a photo of <a> on a beach", CONCEPTS) == "a photo of <a> dog on a beach"
    assert expand("a photo of <a> dog. Posing with <b> sunglasses", CONCEPTS) == "a photo of <a> dog. Posing with <b> sunglasses"
    assert concept_prompt("a photo of a {}", "<a>", "dog") == "a photo of a <a> dog"


def test_unknown_concept_lists_the_known_ones():
    with pytest.raises(EdgecpError, match=r"unknown concept <zz>.*<a>, <b>"):
        expand("a photo of <zz>", CONCEPTS)


@pytest.mark.parametrize("name", sorted(profile_files()))
def test_every_shipped_profile_loads(name):
    p = load_profile(name)
    assert p.name == name and p.precision in ("fp32", "fp16", "int8") and p.providers
    assert p.tolerance(10.0) >= p.atol
    assert 30.0 <= p.min_psnr <= 60.0 and p.gate_steps >= 1 and p.gate_size <= 512  # every profile has an image gate


def test_profile_kinds_shipped():
    precisions = {load_profile(n).precision for n in profile_files()}
    assert {"fp32", "fp16", "int8"} <= precisions


def test_unknown_profile_key_lists_the_valid_ones():
    with pytest.raises(EdgecpError, match=r"unknown key 'colour'.*valid keys are .*precision"):
        parse_profile('name = "x"\ndescription = "y"\ncolour = "red"\n', "x.toml")
    with pytest.raises(EdgecpError, match="precision 'fp8' is unknown"):
        parse_profile('name = "x"\ndescription = "y"\nprecision = "fp8"\n', "x.toml")
    with pytest.raises(EdgecpError, match="unknown profile 'nope'"):
        load_profile("nope")


def test_image_gate_keys_are_checked():
    for text, words in (("min_psnr = -1.0", "min_psnr -1.0 must be >= 0 dB"), ("gate_size = 4", "gate_size 4 must be >= 8"),
                        ("gate_steps = 0", "gate_steps 0 must be >= 1")):
        with pytest.raises(EdgecpError, match=words):
            parse_profile(f'name = "x"\ndescription = "y"\n{text}\n', "x.toml")


def test_optimize_is_refused_with_int8():
    with pytest.raises(EdgecpError, match="optimize = true works with fp32 and fp16 only"):
        parse_profile('name = "x"\ndescription = "y"\nprecision = "int8"\noptimize = true\n', "x.toml")
    assert parse_profile('name = "x"\ndescription = "y"\nprecision = "fp32"\noptimize = true\n', "x.toml").optimize


def test_quantization_variants_are_checked():
    base = 'name = "x"\ndescription = "y"\n'
    p = parse_profile(base + 'precision = "int8"\nquantization = ["static", "dynamic"]\n', "x.toml")
    assert p.quantization == ("static", "dynamic")
    assert parse_profile(base + 'precision = "int8"\nquantization = "static"\n', "x.toml").quantization == ("static",)
    for text, words in (('precision = "int8"\nquantization = ["qat"]', r"quantization \['qat'\] must list some of"),
                        ('precision = "int8"\nquantization = []', r"quantization \[\] must list"),
                        ('precision = "int8"\nquantization = ["static", "static"]', "each once"),
                        ('precision = "fp16"\nquantization = ["static"]', 'needs precision = "int8" \\(not fp16\\)'),
                        ('precision = "int8"\ncalibration_steps = 0', "calibration_steps 0 must be >= 1")):
        with pytest.raises(EdgecpError, match=words):
            parse_profile(base + text + "\n", "x.toml")
