"""The configuration: one definition of every field, and the flags and template made from it."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from pathlib import Path

import pytest

from pipelines import embed, reprocess
from segclr_beam import aggregate, cutouts, inference, outputs
from segclr_beam.config import ConfigError, EmbedConfig
from segclr_beam.skeleton import SkeletonOptions

REPO = Path(__file__).resolve().parents[1]


def test_the_commands_defaults_are_the_configs():
    config = EmbedConfig()
    for parser in (embed.build_parser(), reprocess.build_parser()):
        args, _ = parser.parse_known_args(["--previous", "p"])
        assert embed.config_flags(args) == {}  # flags given override nothing else
        helps = {a.dest: a.help for a in parser._actions}
        for field in dataclasses.fields(EmbedConfig):
            default = getattr(config, field.name)
            assert helps[field.name].startswith(field.metadata["help"]), field.name
            shown = re.search(r"\(default ([^)]*)\)$", helps[field.name])
            if default is None or isinstance(default, bool):
                assert shown is None, field.name
                continue
            # The default a user reads, parsed as the flag would be, is the config's.
            assert field.metadata["parse"](shown.group(1)) == default, field.name
    args = embed.build_parser().parse_args(["--radii-nm", "5000,7500", "--formats", "csv_zip",
                                            "--bbox", "0,0,0,8,8,8", "--overwrite"])
    assert embed.config_flags(args) == {"radii_nm": (5000.0, 7500.0), "formats": ("csv_zip",),
                                        "bbox": (0, 0, 0, 8, 8, 8), "overwrite": True}


def test_stages_take_their_defaults_from_one_place():
    config = EmbedConfig()
    skeleton = SkeletonOptions()
    assert (config.chunk_size,) * 3 == skeleton.chunk_size
    assert (config.min_voxels, config.spacing_nm) == (skeleton.min_voxels, skeleton.spacing_nm)
    make = inspect.signature(cutouts.MakeCutouts).parameters
    assert (make["block_size"].default, make["cutout_size"].default) == (
        config.block_size, config.cutout_size)
    assert inspect.signature(aggregate.AggregateEmbeddings).parameters[
        "radii_nm"].default == config.radii_nm
    # Settings whose right value depends on the run have no default of their own.
    write = inspect.signature(outputs.WriteEmbeddings).parameters
    embed_ = inspect.signature(inference.Embed).parameters
    for parameter in (write["num_shards"], write["bytewidth"], write["embedding_dim"],
                      embed_["batch_size"]):
        assert parameter.default is inspect.Parameter.empty, parameter.name


def test_flex_template_metadata_is_generated_from_the_fields():
    written = json.loads((REPO / "pipelines" / "embed_metadata.json").read_text())
    assert written == embed.template_metadata(), (
        "regenerate: python -m pipelines.embed --template-metadata > pipelines/embed_metadata.json")
    names = {p["name"] for p in written["parameters"]}
    parser_flags = {o for a in embed.build_parser()._actions for o in a.option_strings}
    assert {"--" + n for n in names} <= parser_flags
    assert {"em", "segmentation", "model", "output"} == {
        p["name"] for p in written["parameters"] if not p["isOptional"]}


def test_config_file_and_flags(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"num_shards": 8, "radii_nm": [5000], "em": "e"}))
    args, _ = embed.build_parser().parse_known_args(["--config", str(path), "--num-shards", "4"])
    assert embed.config_flags(args) == {"num_shards": 4, "radii_nm": [5000], "em": "e"}
    config = EmbedConfig.from_json(str(path))
    assert (config.num_shards, config.radii_nm) == (8, (5000.0,))
    path.write_text(json.dumps({"num_shard": 8}))
    with pytest.raises(ConfigError, match=rf"num_shard: unknown field in {path}"):
        embed.config_flags(embed.build_parser().parse_known_args(["--config", str(path)])[0])
    with pytest.raises(SystemExit):
        embed.build_parser().parse_args(["--radii-nm", "10um"])


@pytest.mark.parametrize("change, message", [
    ({"cutout_size": 128}, r"^cutout_size: must be a positive odd number"),
    ({"radii_nm": (10000.0, 10000)}, r"^radii_nm: radii must be distinct"),
    ({"radii_nm": ()}, r"^radii_nm: at least one"),
    ({"num_shards": 0}, r"^num_shards: must be an integer >= 1"),
    ({"bytewidth": 0}, r"^bytewidth: must be an integer >= 1"),
    ({"model": None}, r"^model: required"),
    ({"formats": ("csv",)}, r"^formats: a non-empty subset"),
])
def test_validation_names_the_field(change, message):
    config = EmbedConfig(em="e", segmentation="s", model="m", output="o")
    config.validate()
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(config, **change).validate()


def test_pairs_config_shares_the_embed_fields_and_reads_json(tmp_path):
    from pipelines import pairs as pairs_command
    from segclr_beam.config import PairsConfig
    from segclr_beam.pairs import PairOptions

    embed_fields = {f.name: f for f in dataclasses.fields(EmbedConfig)}
    shared = ("segmentation", "resolution", "bbox", "segments", "chunk_size", "min_voxels",
              "spacing_nm", "write_skeletons")
    for field in dataclasses.fields(PairsConfig):
        if field.name in shared:
            assert field.default == embed_fields[field.name].default, field.name
            assert field.metadata["help"] == embed_fields[field.name].metadata["help"]
    assert PairsConfig().options() == PairOptions()
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps({"segmentation": "s", "output": "o", "bbox": [0, 0, 0, 8, 8, 8],
                                "max_pairs": 50}))
    args = pairs_command.build_parser().parse_args(["--config", str(path), "--seed", "3"])
    config = pairs_command.config_from_args(args)
    assert config.bbox == (0, 0, 0, 8, 8, 8) and config.max_pairs == 50 and config.seed == 3
    path.write_text(json.dumps({"segmentation": "s", "model": "m"}))
    with pytest.raises(ConfigError, match="^model: unknown field in"):
        PairsConfig.read_fields(str(path))
    with pytest.raises(ConfigError, match="^spacing_nm: must be > 0"):
        PairsConfig(segmentation="s", output="o", spacing_nm=0).validate()
