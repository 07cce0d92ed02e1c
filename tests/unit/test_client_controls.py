"""The client's side of API 1.1's controls, without a server: the proto ⇄ types conversion read against
the server's own wire code, the JSON keys of both CLIs, a 1.0 reader of 1.1 messages, the flags both
CLIs take, the tables' marker and the pictures' hatching and legend."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from rich.console import Console

from patchscope.explain import events as server_events
from patchscope.explain.request import Site as ServerSite
from patchscope.wire import control_to_proto, target_from_proto
from patchscope_client import (
    Control,
    Finished,
    ResultTable,
    Site,
    SiteResult,
    collect,
    compatible,
    convert,
    render,
)
from patchscope_client import cli as client_cli
from patchscope_client._proto import patchscope_pb2 as pb
from patchscope_client.version import API_VERSION

SERVER_CONTROL = server_events.Control(
    unpatched_explanation=" Paris, the capital",
    unpatched_answer="Paris",
    same_as_unpatched=True,
    patch_effect=0.125,
    explanation_logprob=-0.5,
    unpatched_logprob=-0.75,
    dependence=0.25,
    confidence=0.625,
    calibrator_id="cal-smollm2-gemma3-attribute",
)


def finished_event(control: pb.Control | None, index: int = 0) -> pb.ExplainEvent:
    message = pb.ExplainEvent(
        request_id="r",
        site=pb.Site(index=index, position=-1, source_layer=2, target_layer=1, source_token=" Paris"),
        emitted_at=1.0,
        finished=pb.SiteFinished(explanation=" Paris is", answer="Paris"),
    )
    if control is not None:
        message.finished.control.CopyFrom(control)
    return message


# ---- convert / types --------------------------------------------------------------------------------


def test_a_control_the_server_writes_reads_back_field_for_field():
    event = convert.event(finished_event(control_to_proto(SERVER_CONTROL)))
    assert isinstance(event, Finished)
    assert event.control == Control(
        unpatched_explanation=" Paris, the capital",
        unpatched_answer="Paris",
        same_as_unpatched=True,
        patch_effect=0.125,
        explanation_logprob=-0.5,
        unpatched_logprob=-0.75,
        dependence=0.25,
        confidence=0.625,
        calibrator_id="cal-smollm2-gemma3-attribute",
    )


def test_unset_optional_fields_read_as_none_and_zero_stays_zero():
    no_calibrator = server_events.Control(
        unpatched_explanation=" x",
        unpatched_answer="x",
        same_as_unpatched=False,
        patch_effect=0.0,  # a real 0, not "unset"
        explanation_logprob=None,
        unpatched_logprob=None,
        dependence=None,
        confidence=None,
    )
    control = convert.event(finished_event(control_to_proto(no_calibrator))).control
    assert control is not None and control.patch_effect == 0.0
    assert control.confidence is None and control.dependence is None and control.explanation_logprob is None
    assert control.unpatched_logprob is None and control.calibrator_id == "" and not control.same_as_unpatched


def test_no_control_on_the_wire_is_none_and_its_json_keys_are_null():
    event = convert.event(finished_event(None))
    assert event.control is None
    record = collect([event]).rows[0].to_json()
    assert {k: record[k] for k in client_cli_keys()} == dict.fromkeys(client_cli_keys())


def client_cli_keys() -> tuple[str, ...]:
    return ("unpatched_answer", "same_as_unpatched", "patch_effect", "dependence", "confidence")


def test_client_json_has_the_keys_and_values_of_patchscope_explain_json():
    site = ServerSite(position=-1, source_layer=2, target_layer=1)
    for control in (SERVER_CONTROL, None):
        server = server_events.SiteResult(
            site, " Paris", " Paris is", "Paris", mapping_id="m", mapping_r2=0.5, control=control
        ).to_json()
        message = finished_event(control_to_proto(control) if control else None)
        started = convert.event(
            pb.ExplainEvent(site=message.site, started=pb.SiteStarted(mapping_id="m", mapping_r2=0.5))
        )
        client = collect([started, convert.event(message)]).rows[0].to_json()
        assert client == server


def test_requests_leave_controls_unset_by_default_and_send_false_when_turned_off():
    on = convert.target_spec("gemma3-270m")
    off = convert.target_spec("gemma3-270m", controls=False)
    assert not on.HasField("controls") and target_from_proto(on).controls is True
    assert off.HasField("controls") and off.controls is False and target_from_proto(off).controls is False


def test_explain_and_explain_activations_pass_controls_false_to_the_request():
    from patchscope_client import AsyncPatchscopeClient, PatchscopeClient

    seen: list[pb.TargetSpec] = []

    def record(name):
        def call(self, method, stub_call, request, timeout):
            seen.append(request.target)
            return iter(())

        return call

    for cls in (PatchscopeClient, AsyncPatchscopeClient):
        client = cls.__new__(cls)
        client._stub = type("Stub", (), {"Explain": None, "ExplainActivations": None})()
        client._stream = record(cls.__name__).__get__(client)
        client.explain("s", "p", [1], target="t", controls=False)
        client.explain_activations(np.zeros((1, 4), np.float32), source="s", layers=[1], target="t")
    assert [s.HasField("controls") for s in seen] == [True, False, True, False]
    assert seen[0].controls is False and seen[2].controls is False


# ---- an older (1.0) reader, and the version rule ----------------------------------------------------


def api_1_0_classes():
    """The 1.0 schema: this proto without `Control`, `SiteFinished.control` and the target's control flags."""
    file = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    kept = [m for m in file.message_type if m.name != "Control"]
    del file.message_type[:]
    file.message_type.extend(kept)
    for message in file.message_type:
        drop = {"SiteFinished": {"control"}, "TargetSpec": {"controls", "mean_state_control"}}
        fields = [f for f in message.field if f.name not in drop.get(message.name, set())]
        del message.field[:]
        message.field.extend(fields)
        if message.name == "TargetSpec":
            del message.oneof_decl[:]  # `optional` is a synthetic oneof; its only member is gone
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"patchscope.v1.{name}"))
        for name in ("ExplainEvent", "TargetSpec")
    }


def test_a_1_0_reader_parses_a_1_1_event_and_ignores_the_control():
    old = api_1_0_classes()
    data = finished_event(control_to_proto(SERVER_CONTROL)).SerializeToString()
    parsed = old["ExplainEvent"].FromString(data)
    assert "control" not in parsed.finished.DESCRIPTOR.fields_by_name
    assert parsed.finished.explanation == " Paris is" and parsed.finished.answer == "Paris"
    assert parsed.site.source_token == " Paris"
    spec = old["TargetSpec"].FromString(convert.target_spec("t", controls=False).SerializeToString())
    assert spec.model == "t" and "controls" not in spec.DESCRIPTOR.fields_by_name


def test_the_version_rule_accepts_a_1_3_server_for_every_older_1_x_client():
    assert API_VERSION == "1.3"
    assert all(compatible("1.3", f"1.{minor}") for minor in range(4))
    assert not compatible("1.1", "1.3") and not compatible("2.3", "1.3")


# ---- the two CLIs -----------------------------------------------------------------------------------


def option_strings(parser, command: str) -> set[str]:
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {s for action in sub.choices[command]._actions for s in action.option_strings}


def test_both_clis_take_the_same_flags_for_the_same_things():
    from patchscope.cli import build_parser as server_parser

    client, server = (
        option_strings(client_cli.build_parser(), "explain"),
        option_strings(server_parser(), "explain"),
    )
    connection = {"--address", "--token", "--tls", "--tls-ca", "--tls-cert", "--tls-key", "--timeout"}
    pictures = {"--html", "--png"}  # the client draws; the server CLI has no pictures
    assert client - connection - pictures <= server, sorted(client - connection - pictures - server)
    assert "--no-controls" in client & server and {"--position", "--positions"} <= client & server


@pytest.mark.parametrize("argv, controls", [([], True), (["--no-controls"], False)])
def test_no_controls_parses_the_same_on_both_clis(argv, controls):
    from patchscope.cli import build_parser as server_parser

    common = ["explain", "Paris", "--source", "a", "--target", "b", "--layers", "1", *argv]
    client_args = client_cli.build_parser().parse_args(common)
    server_args = server_parser().parse_args(common)
    assert client_args.controls is controls and server_args.controls is controls
    assert client_cli._options(client_args)["controls"] is controls


def row(index: int, layer: int, control: Control | None, answer: str = "Paris") -> SiteResult:
    return SiteResult(Site(index, 3, layer, layer, " Paris"), f" {answer} is", answer, control=control)


def control(same: bool, confidence: float | None = 0.8, effect: float | None = 0.4) -> Control:
    return Control(" Lyon", "Lyon", same, patch_effect=effect, confidence=confidence, dependence=0.1)


def test_the_client_table_shows_confidence_and_marks_sites_equal_to_the_unpatched_control():
    table = ResultTable([row(0, 1, control(True, 0.25)), row(1, 2, control(False, None)), row(2, 3, None)])
    console = Console(file=io.StringIO(), width=200, record=True)
    client_cli.print_table(table, console)
    lines = console.export_text().splitlines()
    body = {line.split("│")[1].strip(): line for line in lines if line.count("│") > 5}
    assert "0.25" in body["1"] and "= unpatched" in body["1"]
    assert "= unpatched" not in body["2"] and [c.strip() for c in body["2"].split("│")][7] == "-"
    assert [c.strip() for c in body["3"].split("│")][7:9] == ["-", "-"]


def test_the_server_table_cells_are_the_client_s():
    from patchscope.cli.explain import SAME_AS_MEAN_STATE, SAME_AS_UNPATCHED, control_cells

    assert (SAME_AS_UNPATCHED, SAME_AS_MEAN_STATE) == (
        client_cli.SAME_AS_UNPATCHED,
        client_cli.SAME_AS_MEAN_STATE,
    )
    mean_same = dataclasses.replace(control(False, 0.5), mean_state_answer="x", same_as_mean_state=True)
    for c in (control(True, 0.25), control(False, None), mean_same, None):
        server = None if c is None else server_events.Control(**c.__dict__)
        assert control_cells(server) == client_cli.control_cells(row(0, 1, c))
    assert client_cli.control_cells(row(0, 1, mean_same))[1] == "= mean state"


def test_stream_json_objects_carry_the_control_keys(capsys):
    message = finished_event(control_to_proto(SERVER_CONTROL))
    client_cli.stream_json([convert.event(message)])
    record = json.loads(capsys.readouterr().out)
    assert record["same_as_unpatched"] is True and record["confidence"] == 0.625
    assert record["unpatched_answer"] == "Paris" and record["dependence"] == 0.25
    assert record["patch_effect"] == 0.125


# ---- pictures -----------------------------------------------------------------------------------------


def test_html_hatches_cells_equal_to_the_unpatched_control_and_shades_the_rest_by_confidence():
    table = ResultTable([row(0, 1, control(True, 0.9)), row(1, 2, control(False, 0.5))])
    page = render.to_html(table, "t")
    cells = [cell.split("</td>")[0] for cell in page.split('class="site"')[1:]]
    assert len(cells) == 2
    assert 'data-control="same-as-unpatched"' in cells[0] and "repeating-linear-gradient" in cells[0]
    assert "data-shade" not in cells[0]  # a hatched cell is not shaded as if it meant something
    assert 'data-shade="0.500"' in cells[1] and "repeating-linear-gradient" not in cells[1]
    legend = page.split('id="legend"')[1]
    assert "confidence" in legend and "= unpatched" in legend
    assert "<script" not in page and "http" not in page.split("<body>")[1]


def test_html_falls_back_to_patch_effect_then_to_the_old_score_and_says_which():
    effect = render.to_html(ResultTable([row(0, 1, control(False, None, 0.3))]), "t")
    assert 'data-shade="0.300"' in effect and "patch effect" in effect.split('id="legend"')[1]
    bare = render.to_html(ResultTable([row(0, 1, None, answer="Paris"), row(1, 2, None, answer="x")]), "t")
    assert 'data-shade="1.000"' in bare and 'data-shade="0.000"' in bare
    legend = bare.split('id="legend"')[1]
    assert "answer is the source token" in legend and "no controls" in legend


def grey_pixels(path) -> int:
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=int)
    spread = rgb.max(axis=2) - rgb.min(axis=2)
    return int(((spread < 6) & (rgb.min(axis=2) > 120) & (rgb.min(axis=2) < 235)).sum())


def test_png_hatches_cells_equal_to_the_unpatched_control(tmp_path):
    same, differs = tmp_path / "same.png", tmp_path / "differs.png"
    render.to_png(ResultTable([row(0, 1, control(True)), row(1, 2, control(False))]), "t", str(same))
    render.to_png(ResultTable([row(0, 1, control(False)), row(1, 2, control(False))]), "t", str(differs))
    assert grey_pixels(same) > grey_pixels(differs) + 1500
