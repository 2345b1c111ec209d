"""`mpc buildah-remote` on Konflux-shaped inputs: the output differs from the input only
where the conversion changes it; $(params.IMAGE) in scripts; --strict."""
from __future__ import annotations

import difflib
from pathlib import Path

import pytest
import yaml
from ruamel.yaml import YAML

from mpc.generator import buildah_remote as br
from mpc.generator.cli import main

from .test_buildah_remote_generate import SHAPES, SRC

SHAPES_DIR = Path(__file__).parent / "shapes"
KONFLUX = {p.stem: p.read_text() for p in sorted(SHAPES_DIR.glob("*.yaml"))}


def touched_ranges(text: str, out: str) -> dict[str, tuple[int, int]]:
    """Input line ranges [first, last] the conversion may change, by what they are."""
    lines = text.splitlines()
    task = YAML().load(text)
    spec = task["spec"]
    converted = yaml.safe_load(out)

    def key_range(mapping, key) -> tuple[int, int]:
        first = mapping.lc.key(key)[0]
        col = mapping.lc.key(key)[1]
        last = first
        for j in range(first + 1, len(lines)):
            ln = lines[j]
            if not ln.strip() or ln.lstrip().startswith("#"):
                continue
            ind = len(ln) - len(ln.lstrip(" "))
            if ind > col or (ind == col and ln[col:col + 2] == "- "):
                last = j
            else:
                break
        return first, last

    r = {"metadata.name": key_range(task["metadata"], "name")}
    if any(k not in spec for k in ("params", "volumes", "stepTemplate")):
        end = key_range(task, "spec")[1]
        r["spec: a key it did not have"] = (end, end)
    for k in ("params", "volumes"):
        if k in spec:
            r[k] = key_range(spec, k)
    if "stepTemplate" in spec and "env" in spec["stepTemplate"]:
        r["stepTemplate.env"] = key_range(spec["stepTemplate"], "env")
    out_steps = {s["name"]: s for s in converted["spec"]["steps"]}
    for s in spec["steps"]:
        if s["name"] == "build":
            first = s.lc.line
            last = max(key_range(s, k)[1] for k in s)
            r["step build"] = (first, last)
        elif out_steps[s["name"]].get("script") != s.get("script"):
            r[f"step {s['name']} script"] = key_range(s, "script")
    return r


@pytest.mark.parametrize("shape", sorted(KONFLUX) + sorted(SHAPES))
def test_output_differs_from_the_input_only_where_the_conversion_changes_it(shape):
    text = KONFLUX.get(shape) or SHAPES[shape]
    out = br.generate(text).text
    a, b = text.splitlines(), out.splitlines()
    ranges = touched_ranges(text, out)
    changed_name = False
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            continue
        if op == "insert":
            # new lines go right after or inside something the conversion extends
            assert any(first < i1 <= last + 1 for first, last in ranges.values()), \
                (shape, i1, b[j1:j2][:3])
            continue
        # replaced or deleted input lines: the Task's name, or a script the conversion rewrote
        inside = [k for k, (first, last) in ranges.items() if first <= i1 and i2 - 1 <= last]
        assert inside, (shape, op, a[i1:i2][:5], b[j1:j2][:5])
        if inside == ["metadata.name"]:
            assert (i2 - i1, j2 - j1) == (1, 1)
            name = str(YAML().load(text)["metadata"]["name"])
            assert b[j1] == a[i1].replace(name, br.remote_name(name), 1)
            changed_name = True
        else:
            assert any(k.startswith("step ") for k in inside), (shape, inside, a[i1:i2])
    assert changed_name
    # every comment line, every blank line and each wrapped continuation line is still there
    for ln in a:
        if ln.lstrip().startswith("#") or not ln.strip():
            assert a.count(ln) <= b.count(ln), (shape, ln)
    # a step the conversion does not touch is there byte for byte
    task = YAML().load(text)
    steps = task["spec"]["steps"]
    for s, nxt in zip(steps, steps[1:] + [None]):
        key = f"step {s['name']} script"
        if s["name"] == "build" or key in ranges:
            continue
        end = nxt.lc.line if nxt is not None else s.lc.line + 1
        block = "\n".join(a[s.lc.line:end])
        assert block in out, (shape, s["name"])


def test_konflux_formatting_is_kept_in_what_the_conversion_adds():
    out = br.generate(KONFLUX["buildah-0.4-shape"]).text
    # sequences as the input writes them: the dash under the parent key
    assert "\n  - name: PLATFORM\n    type: string\n" in out
    assert "\n    - name: PLATFORM\n      value: $(params.PLATFORM)\n" in out      # stepTemplate.env
    assert "\n  - name: mpc-ssh\n    secret:\n" in out
    assert "\n    - name: mpc-ssh\n      mountPath: /ssh\n      readOnly: true\n" in out
    # the wrapped description and the quoted annotation of the input, unchanged
    assert ("    description: HTTP/HTTPS proxy for buildah's own pulls during the build. Not passed\n"
            "      to the RUN instructions of the Containerfile.\n") in out
    assert "    tekton.dev/tags: 'image-build, konflux'\n" in out


# --- $(params.IMAGE) in scripts -----------------------------------------------------

def catalog_style(text: str) -> str:
    """The reference Task as the Tekton catalog writes scripts: $(params.IMAGE), no IMAGE env."""
    text = text.replace("      - name: IMAGE\n        value: $(params.IMAGE)\n", "")
    text = text.replace('--file="$DOCKERFILE" --tag="$IMAGE" "$CONTEXT"',
                        '--file="$DOCKERFILE" --tag=$(params.IMAGE) "$CONTEXT"\n'
                        "        echo 'built $(params.IMAGE)'")
    text = text.replace('--digestfile="$digest_file" "$IMAGE" "docker://$IMAGE"',
                        '--digestfile="$digest_file" "$(params.IMAGE)" docker://$(params.IMAGE)')
    text = text.replace("printf '%s' \"$IMAGE\" > \"$RESULT_IMAGE_URL\"",
                        "printf '%s' '$(params.IMAGE)' > \"$RESULT_IMAGE_URL\"")
    text = text.replace('echo "pushed $IMAGE@', 'echo "pushed $(params.IMAGE)@')
    assert "$IMAGE" not in text and text.count("$(params.IMAGE)") == 6
    return text


CATALOG_STYLE = catalog_style(SRC.read_text())


def test_params_image_in_scripts_is_read_from_an_env_the_remote_script_gets(tmp_path, capsys):
    res = br.generate(CATALOG_STYLE, br.Options(strict=True))
    assert res.warnings == []
    out = yaml.safe_load(res.text)
    tenv = {e["name"]: e["value"] for e in out["spec"]["stepTemplate"]["env"]}
    assert tenv["IMAGE"] == "$(params.IMAGE)"
    steps = {s["name"]: s["script"] for s in out["spec"]["steps"]}
    assert "$(params.IMAGE)" not in steps["build"] + steps["push"]
    # each use reads the env, quoted to give the same word where it stands
    assert '--tag="${IMAGE}" "$CONTEXT"' in steps["build"]
    assert "echo 'built '\"${IMAGE}\"''" in steps["build"]
    assert '"${IMAGE}" docker://"${IMAGE}"' in steps["push"]
    assert "printf '%s' ''\"${IMAGE}\"'' >" in steps["push"]
    # the image comes back and the push step is tagged per platform like any $IMAGE user
    assert 'env_add MPC_EXPORT_IMAGE "$IMAGE"' in steps["build"]
    assert steps["push"].startswith("#!/bin/bash\n" + br.append_platform_snippet("IMAGE"))
    src, dst = tmp_path / "in.yaml", tmp_path / "out.yaml"
    src.write_text(CATALOG_STYLE)
    assert main(["buildah-remote", "--strict", "--from", str(src), "--out", str(dst)]) == 0
    assert capsys.readouterr().err == ""


def test_params_image_where_the_shell_does_not_expand_is_refused(tmp_path, capsys):
    text = CATALOG_STYLE.replace(
        "        echo 'built $(params.IMAGE)'\n",
        "        cat > /tmp/built <<'EOF'\n        $(params.IMAGE)\n        EOF\n")
    src, dst = tmp_path / "in.yaml", tmp_path / "out.yaml"
    src.write_text(text)
    assert main(["buildah-remote", "--from", str(src), "--out", str(dst)]) == 1
    err = capsys.readouterr().err
    assert "step build: line 11 has $(params.IMAGE) in a here-document with a quoted delimiter" \
        in err
    assert "use $IMAGE in the script" in err
    assert not dst.exists()


def test_strict_turns_every_warning_into_an_error(tmp_path, capsys):
    # no IMAGE anywhere: the image cannot be brought back (a warning by default)
    text = SHAPES["no-workspace"].replace("IMAGE", "OUTPUT_IMAGE")
    src, dst = tmp_path / "in.yaml", tmp_path / "out.yaml"
    src.write_text(text)
    assert main(["buildah-remote", "--from", str(src), "--out", str(dst)]) == 0
    assert "warning: no env IMAGE in the build step" in capsys.readouterr().err
    dst.unlink()
    assert main(["buildah-remote", "--strict", "--from", str(src), "--out", str(dst)]) == 1
    err = capsys.readouterr().err
    assert "--strict" in err and "no env IMAGE in the build step" in err
    assert not dst.exists()
