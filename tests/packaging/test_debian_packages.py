"""What the two Debian packages hold: files, control fields, maintainer scripts, units.

Read with dpkg-deb (--contents, --field, --ctrl-tarfile) from the packages packaging/build
made by this test run; nothing is installed on the machine.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from package_build import ROOT, Built, unit_settings

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(2400)]

RESOURCES = ROOT / "resources"
HICOLOR_SIZES = ("16x16", "22x22", "24x24", "32x32", "48x48", "64x64", "128x128", "256x256")
# Qt parts the tray must never carry (the one-folder bundle would grow by hundreds of MB).
QT_LEFT_OUT = re.compile(
    r"Qt6?(WebEngine|3D|Quick|Qml|Multimedia|Pdf|Designer|Charts|DataVisualization|Sql|Test)"
    r"|libqwayland|libqeglfs|libqvnc|libqgtk3|qtvirtualkeyboard|platformthemes/libqgtk"
)
DESKTOP_ONLY = re.compile(r"PySide6|shiboken6|libQt6|numpy|pyqtgraph|keyring", re.IGNORECASE)


def contents(deb: Path) -> dict[str, tuple[str, str]]:
    """path → (mode and owner columns, symlink target or '') from ``dpkg-deb --contents``."""
    out = subprocess.run(
        ["dpkg-deb", "--contents", str(deb)], capture_output=True, text=True, check=True
    ).stdout
    entries = {}
    for line in out.splitlines():
        fields = line.split(None, 5)
        name = fields[5]
        target = ""
        if " -> " in name:
            name, target = name.split(" -> ", 1)
        entries[name.removeprefix(".").rstrip("/") or "/"] = (f"{fields[0]} {fields[1]}", target)
    return entries


def control_field(deb: Path, name: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "--field", str(deb), name], capture_output=True, text=True, check=True
    ).stdout.strip()


def maintainer_scripts(deb: Path) -> dict[str, str]:
    raw = subprocess.run(
        ["dpkg-deb", "--ctrl-tarfile", str(deb)], capture_output=True, check=True
    ).stdout
    scripts = {}
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if name in ("postinst", "prerm", "postrm"):
                assert member.mode & 0o111, f"{name} is not executable"
                scripts[name] = tar.extractfile(member).read().decode()  # type: ignore[union-attr]
    return scripts


def depends(deb: Path) -> set[str]:
    return {
        re.split(r"[\s(]", item.strip())[0]
        for item in control_field(deb, "Depends").split(",")
        if item.strip()
    }


def test_the_laptop_package_holds_both_bundles_the_unit_and_the_desktop_files(
    built: Built,
) -> None:
    files = contents(built.laptop)
    for path in (
        "/opt/braid/braid/braid",
        "/opt/braid/braid-tray/braid-tray",
        "/lib/systemd/system/braidd.service",
        "/usr/share/applications/braid-tray.desktop",
        "/usr/share/braid/autostart/braid-tray.desktop",
        "/usr/share/doc/braid/copyright",
    ):
        assert path in files, path
    assert files["/usr/bin/braid"][1] == "/opt/braid/braid/braid"
    assert files["/usr/bin/braid-tray"][1] == "/opt/braid/braid-tray/braid-tray"
    assert files["/opt/braid/braid/braid"][0].startswith("-rwxr-xr-x")
    # everything root's (dpkg-deb --root-owner-group), nothing writable by others
    for path, (mode_owner, _) in files.items():
        assert mode_owner.endswith(" root/root"), (path, mode_owner)
        assert mode_owner[8] != "w" or mode_owner[0] == "l", (path, mode_owner)
    assert not any(path.startswith("/etc/xdg/autostart") for path in files)


def test_icons_at_every_hicolor_size_and_scalable(built: Built) -> None:
    files = contents(built.laptop)
    icons = "/usr/share/icons/hicolor"
    for size in HICOLOR_SIZES:
        assert f"{icons}/{size}/apps/braid.png" in files, size
    assert f"{icons}/scalable/apps/braid.svg" in files
    # every icon of the source tree, the tray's status icons included
    for source in (RESOURCES / "icons" / "hicolor").rglob("*.*"):
        relative = source.relative_to(RESOURCES / "icons" / "hicolor")
        assert f"{icons}/{relative}" in files, relative


def test_the_command_and_daemon_bundle_carries_no_desktop_parts(built: Built) -> None:
    files = contents(built.laptop)
    cli = [p for p in files if p.startswith("/opt/braid/braid/")]
    assert cli, "no /opt/braid/braid bundle"
    assert not [p for p in cli if DESKTOP_ONLY.search(p)]
    server = contents(built.server)
    assert not [p for p in server if DESKTOP_ONLY.search(p)]


def test_the_tray_bundle_leaves_unused_qt_out(built: Built) -> None:
    tray = [p for p in contents(built.laptop) if p.startswith("/opt/braid/braid-tray/")]
    assert [p for p in tray if p.endswith("/platforms/libqxcb.so")], "no xcb platform plugin"
    assert [p for p in tray if p.endswith("/platforms/libqoffscreen.so")]
    assert [p for p in tray if p.endswith("/imageformats/libqsvg.so")]
    libraries = [p for p in tray if re.search(r"\.so(\.|$)", p)]
    assert not [p for p in libraries if QT_LEFT_OUT.search(p)]
    assert not [p for p in libraries if re.search(r"libgtk-3|libgdk-3|libwayland-client", p)]
    assert [p for p in tray if p.endswith("/resources/icons/hicolor/scalable/apps/braid.svg")]


def test_the_server_package(built: Built) -> None:
    files = contents(built.server)
    assert files["/usr/bin/braid-server"][1] == "/opt/braid-server/braid-server"
    for path in (
        "/opt/braid-server/braid-server",
        "/lib/systemd/system/braid-server.service",
        "/usr/lib/braid-server/raise-mptcp-limits",
        "/usr/share/doc/braid-server/copyright",
    ):
        assert path in files, path
    assert files["/usr/lib/braid-server/raise-mptcp-limits"][0].startswith("-rwxr-xr-x")
    assert not [p for p in files if p.startswith("/opt/braid/")]


@pytest.mark.parametrize("which", ["laptop", "server"])
def test_control_fields(built: Built, which: str) -> None:
    deb = getattr(built, which)
    name = "braid" if which == "laptop" else "braid-server"
    assert control_field(deb, "Package") == name
    assert control_field(deb, "Version") == built.version
    assert control_field(deb, "Architecture") == "amd64"
    needed = {"libc6", "iproute2", "adduser"}
    if which == "laptop":
        needed |= {"nftables", "libxcb1"}
    assert needed <= depends(deb), depends(deb)
    installed_kib = int(control_field(deb, "Installed-Size"))
    assert installed_kib * 1024 > deb.stat().st_size  # compressed is smaller
    built.note(
        f"{deb.name}: {deb.stat().st_size / 1e6:.1f} MB, installed {installed_kib / 1024:.1f} MiB"
    )


def test_laptop_maintainer_scripts(built: Built) -> None:
    scripts = maintainer_scripts(built.laptop)
    postinst, prerm, postrm = scripts["postinst"], scripts["prerm"], scripts["postrm"]
    assert "addgroup --system" in postinst and "braid" in postinst
    assert "usermod -aG braid" in postinst
    assert "[ -d /run/systemd/system ]" in postinst
    assert "systemctl enable --now braidd.service" in postinst
    assert "systemctl stop braidd.service" in prerm
    assert "braid daemon --cleanup" in prerm
    assert "rm -rf /var/lib/braid" in postrm and "purge" in postrm
    for name, text in scripts.items():
        assert text.startswith("#!/bin/sh\n"), name
        subprocess.run(["sh", "-n"], input=text, text=True, check=True)


def test_server_maintainer_scripts(built: Built) -> None:
    scripts = maintainer_scripts(built.server)
    postinst = scripts["postinst"]
    assert "adduser --system" in postinst and "braid-server" in postinst
    assert (
        "sudo braid-server init --state-dir /var/lib/braid-server --listen '[::]:7443' "
        "--public-host <your host>"
    ) in postinst
    assert "systemctl enable --now braid-server" in postinst
    assert "systemctl stop braid-server.service" in scripts["prerm"]
    assert "rm -rf /var/lib/braid-server" in scripts["postrm"]
    for name, text in scripts.items():
        assert text.startswith("#!/bin/sh\n"), name
        subprocess.run(["sh", "-n"], input=text, text=True, check=True)


STUB = """#!/bin/sh
echo "$(basename "$0") $*" >> "{log}"
[ "$(basename "$0")" = getent ] && exit 2
exit 0
"""


def run_postinst(script: str, tmp_path: Path, *args: str) -> tuple[str, list[str]]:
    """Run a postinst with every command it could change the system with replaced by a stub."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    log = tmp_path / "calls"
    for command in ("addgroup", "adduser", "getent", "systemctl", "usermod", "deb-systemd-helper"):
        path = stubs / command
        path.write_text(STUB.format(log=log))
        path.chmod(0o755)
    script_path = tmp_path / "postinst"
    script_path.write_text(script)
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "SUDO_USER": "alice", "HOME": str(tmp_path)}
    done = subprocess.run(
        ["sh", str(script_path), *args], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    return done.stdout + done.stderr, calls


def test_laptop_postinst_makes_the_group_and_says_how_to_join_it(
    built: Built, tmp_path: Path
) -> None:
    output, calls = run_postinst(
        maintainer_scripts(built.laptop)["postinst"], tmp_path, "configure"
    )
    assert "getent group braid" in calls
    assert "addgroup --system --quiet braid" in calls
    assert "sudo usermod -aG braid alice" in output
    if os.path.isdir("/run/systemd/system"):
        assert "systemctl enable --now braidd.service" in calls
    else:  # no systemd running here: enabled for the next boot, nothing started
        assert "systemctl enable braidd.service" in calls
        assert not [c for c in calls if "--now" in c or c.startswith("systemctl start")]


def test_server_postinst_makes_its_user_and_tells_how_to_pair(built: Built, tmp_path: Path) -> None:
    output, calls = run_postinst(
        maintainer_scripts(built.server)["postinst"], tmp_path, "configure"
    )
    assert any(c.startswith("adduser --system --group") and "braid-server" in c for c in calls)
    assert "braid-server init --state-dir /var/lib/braid-server" in output
    assert "systemctl enable --now braid-server" in output
    assert not [c for c in calls if c.startswith("systemctl enable")]  # not before init


def test_braidd_unit_is_root_without_other_capabilities_and_hardened(unpacked: Path) -> None:
    unit = unit_settings(unpacked / "lib/systemd/system/braidd.service")
    assert unit["ExecStartPre"] == ["/usr/bin/braid daemon --cleanup --state-dir /var/lib/braid"]
    assert unit["ExecStopPost"] == [
        '/bin/sh -c \'[ "$SERVICE_RESULT" = success ] || '
        "exec /usr/bin/braid daemon --cleanup --state-dir /var/lib/braid'"
    ]
    assert unit["ReadWritePaths"] == ["/proc/sys/net/mptcp"]
    assert unit["ExecStart"] == [
        "/usr/bin/braid --control /run/braid/control.sock daemon --state-dir /var/lib/braid"
    ]
    assert unit["User"] == ["root"]
    # NET_BIND_SERVICE: system-wide mode answers DNS from a transparent socket on port 53
    needed = {"CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW"}
    assert set(unit["CapabilityBoundingSet"][0].split()) == needed
    assert set(unit["AmbientCapabilities"][0].split()) == needed
    assert unit["Restart"] == ["on-failure"]
    # Two descriptors per flow; systemd's default soft limit (1024) is not enough.
    assert unit["LimitNOFILE"] == ["65536"]
    assert unit["RuntimeDirectory"] == ["braid"] and unit["RuntimeDirectoryMode"] == ["0755"]
    assert unit["StateDirectory"] == ["braid"] and unit["StateDirectoryMode"] == ["0700"]
    assert unit["ProtectSystem"] == ["strict"]
    for key in (
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "RestrictSUIDSGID",
        "NoNewPrivileges",
        "ProtectKernelModules",
        "MemoryDenyWriteExecute",  # the tunnel test runs the frozen daemon so (PR_SET_MDWE)
    ):
        assert unit[key] == ["yes"], key


def test_braid_server_unit_runs_unprivileged(unpacked: Path) -> None:
    unit = unit_settings(unpacked / "lib/systemd/system/braid-server.service")
    assert unit["User"] == ["braid-server"]
    assert unit["ExecStart"] == ["/usr/bin/braid-server run --state-dir /var/lib/braid-server"]
    assert unit["ConditionPathExists"] == ["/var/lib/braid-server/server.json"]
    assert unit["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert unit["NoNewPrivileges"] == ["yes"] and unit["ProtectSystem"] == ["strict"]
    assert unit["MemoryDenyWriteExecute"] == ["yes"]
    assert "+/usr/lib/braid-server/raise-mptcp-limits 8" in unit["ExecStartPre"]
    # Tunnels' fixed receive buffer needs net.core.rmem_max of 32 MiB: raised as root, never
    # lowered, and a failure (a read-only /proc/sys) does not stop the start.
    (raise_rmem,) = [line for line in unit["ExecStartPre"] if "rmem_max" in line]
    assert raise_rmem.startswith("+/bin/sh -c ") and "33554432" in raise_rmem
    assert raise_rmem.rstrip("'").endswith("|| true") and "-ge 33554432" in raise_rmem


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
@pytest.mark.parametrize("unit", ["braidd.service", "braid-server.service"])
def test_systemd_analyze_verify(unpacked: Path, tmp_path: Path, unit: str) -> None:
    """The unit as shipped, with its programs found in the unpacked tree instead of /usr."""
    text = (unpacked / "lib/systemd/system" / unit).read_text()
    text = re.sub(
        r"(?<![\w/])/usr/(bin|lib/braid-server)/[\w-]+",
        lambda match: str(in_tree(unpacked, match.group(0))),
        text,
    )
    copy = tmp_path / unit
    copy.write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert unit not in done.stderr, done.stderr


def in_tree(root: Path, path: str) -> Path:
    """Where an installed path lies in the unpacked tree (absolute links followed inside it)."""
    inside = root / path.lstrip("/")
    while inside.is_symlink():
        target = os.readlink(inside)
        inside = root / target.lstrip("/") if target.startswith("/") else inside.parent / target
    return inside


def test_every_library_from_outside_the_bundles_is_a_declared_dependency(
    built: Built, unpacked: Path
) -> None:
    """What each frozen binary loads from the system comes from a package in Depends."""
    if shutil.which("ldd") is None or shutil.which("dpkg") is None:
        pytest.skip("needs ldd and dpkg")
    declared = {
        "laptop": with_their_dependencies(depends(built.laptop)),
        "server": with_their_dependencies(depends(built.server)),
    }
    bundles = {
        "laptop": [unpacked / "opt/braid/braid", unpacked / "opt/braid/braid-tray"],
        "server": [unpacked / "opt/braid-server"],
    }
    for which, roots in bundles.items():
        for bundle in roots:
            outside = external_libraries(bundle)
            for library, path in outside.items():
                assert path != "not found", f"{bundle.name} needs {library}, found nowhere"
                owner = package_of(path)
                assert owner in declared[which], f"{bundle.name}: {library} ({owner}) undeclared"


def external_libraries(bundle: Path) -> dict[str, str]:
    internal = bundle / "_internal"
    env = {**os.environ, "LD_LIBRARY_PATH": str(internal)}
    found: dict[str, str] = {}
    for path in bundle.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        with open(path, "rb") as f:
            if f.read(4) != b"\x7fELF":
                continue
        out = subprocess.run(
            ["ldd", str(path)], capture_output=True, text=True, env=env, check=False
        ).stdout
        for name, target in re.findall(r"^\s*(\S+) => (.+?)(?: \(0x[0-9a-f]+\))?$", out, re.M):
            if not target.startswith(str(bundle)):
                found[name] = target
    return found


def package_of(path: str) -> str:
    candidates = [path, os.path.realpath(path)]
    for candidate in list(candidates):
        if candidate.startswith("/usr/lib/"):
            candidates.append(candidate.removeprefix("/usr"))  # merged /usr
    for candidate in candidates:
        done = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
        if done.returncode == 0:
            return done.stdout.split(":", 1)[0].strip()
    return f"no package owns {path}"


def with_their_dependencies(packages: set[str]) -> set[str]:
    """The packages and, as installed here, everything they depend on (libgl1 brings libglx0)."""
    closure, todo = set(), list(packages)
    while todo:
        name = todo.pop()
        if name in closure:
            continue
        closure.add(name)
        done = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Depends},${Pre-Depends}", name],
            capture_output=True,
            text=True,
            check=False,
        )
        for item in re.split(r"[,|]", done.stdout):
            dependency = re.split(r"[\s(:]", item.strip())[0]
            if dependency:
                todo.append(dependency)
    return closure
