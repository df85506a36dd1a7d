"""What the three PyInstaller specs share: paths, exclusions, hidden imports, the Qt trim.

The specs import this module (PyInstaller runs them with SPECPATH set to this directory).
Everything a bundle carries is listed here or in its spec, never left to chance: the
daemon's and the server's bundles carry no Qt and no numpy, the tray's only the Qt parts
it uses.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGING = Path(__file__).resolve().parent
ROOT = PACKAGING.parent
APP = ROOT / "app"
RESOURCES = ROOT / "resources"
ENTRY = PACKAGING / "entry"
RUNTIME_HOOKS = [str(PACKAGING / "hooks" / "rthook_child_environment.py")]

# Never needed by any bundle: development tools and the standard library's GUI and docs.
EXCLUDE_ALWAYS = [
    "tkinter",
    "_tkinter",
    "turtle",
    "turtledemo",
    "idlelib",
    "lib2to3",
    "pydoc_data",
    "ensurepip",
    "venv",
    "distutils",
    "setuptools",
    "pkg_resources",
    "pip",
    "pytest",
    "_pytest",
    "pytestqt",
    "hypothesis",
    "IPython",
    "matplotlib",
    "scipy",
    "pandas",
    "PyInstaller",
    # the namespace test world and the demo built on it need a source checkout
    "braid.netbed",
    "braid.demo",
]

# The command line, the daemon and the server: no desktop parts at all.
EXCLUDE_DESKTOP = [
    "PySide6",
    "shiboken6",
    "PyQt5",
    "PyQt6",
    "PySide2",
    "numpy",
    "pyqtgraph",
    "keyring",
    "secretstorage",
    "braid.gui",
]

# Qt bindings the tray does not use: pyqtgraph imports some of them if it can.
EXCLUDE_QT_MODULES = [
    "PyQt5",
    "PyQt6",
    "PySide2",
    "OpenGL",
    "cupy",
    "numba",
    "h5py",
    *(
        f"PySide6.{name}"
        for name in (
            "Qt3DAnimation",
            "Qt3DCore",
            "Qt3DExtras",
            "Qt3DInput",
            "Qt3DLogic",
            "Qt3DRender",
            "QtBluetooth",
            "QtCharts",
            "QtConcurrent",
            "QtDataVisualization",
            "QtDesigner",
            "QtGraphs",
            "QtHelp",
            "QtHttpServer",
            "QtLabsStyleKit",
            "QtLocation",
            "QtMultimedia",
            "QtMultimediaWidgets",
            "QtNetworkAuth",
            "QtNfc",
            "QtPdf",
            "QtPdfWidgets",
            "QtPositioning",
            "QtPrintSupport",
            "QtQml",
            "QtQmlFeatures",
            "QtQuick",
            "QtQuick3D",
            "QtQuickControls2",
            "QtQuickTest",
            "QtQuickWidgets",
            "QtRemoteObjects",
            "QtScxml",
            "QtSensors",
            "QtSerialBus",
            "QtSerialPort",
            "QtSpatialAudio",
            "QtSql",
            "QtStateMachine",
            "QtSvgWidgets",
            "QtTest",
            "QtTextToSpeech",
            "QtUiTools",
            "QtWebChannel",
            "QtWebEngineCore",
            "QtWebEngineQuick",
            "QtWebEngineWidgets",
            "QtWebSockets",
            "QtWebView",
            "QtXml",
        )
    ),
]

# pyroute2 picks its link-kind plugins by listing a package; PyInstaller cannot see that.
HIDDEN_PYROUTE2 = [
    "pyroute2.netlink.generic.mptcp",
    "pyroute2.netlink.rtnl.ifinfmsg.plugins",
    "pyroute2.netlink.rtnl.ifinfmsg.plugins.bond",
    "pyroute2.netlink.rtnl.ifinfmsg.plugins.can",
    "pyroute2.netlink.rtnl.ifinfmsg.plugins.geneve",
    "pyroute2.netlink.rtnl.ifinfmsg.plugins.gtp",
    "pyroute2.netlink.rtnl.ifinfmsg.plugins.ipoib",
    "pyroute2.netlink.rtnl.ifinfmsg.plugins.ipvlan",
    "pyroute2.netlink.rtnl.ifinfmsg.plugins.team",
    "pyroute2.netlink.rtnl.ifinfmsg.plugins.tun",
    "pyroute2.netlink.rtnl.ifinfmsg.plugins.tuntap",
    "pyroute2.netlink.rtnl.ifinfmsg.plugins.vlan",
    "pyroute2.netlink.rtnl.ifinfmsg.plugins.vrf",
    "pyroute2.netlink.rtnl.ifinfmsg.plugins.vti",
    "pyroute2.netlink.rtnl.ifinfmsg.plugins.vti6",
    "pyroute2.netlink.rtnl.ifinfmsg.plugins.vxlan",
    "pyroute2.netlink.rtnl.ifinfmsg.plugins.xfrm",
]
# NetworkManager's view of the links is read over D-Bus with jeepney, imported in a function.
HIDDEN_JEEPNEY = ["jeepney", "jeepney.io", "jeepney.io.blocking"]
# keyring finds its backends through entry points; the tray needs the Secret Service one
# (through secretstorage and jeepney) and KWallet's where dbus-python is installed.
HIDDEN_KEYRING = [
    "keyring.backends",
    "keyring.backends.SecretService",
    "keyring.backends.chainer",
    "keyring.backends.fail",
    "keyring.backends.kwallet",
    "keyring.backends.libsecret",
    "keyring.backends.null",
    "secretstorage",
    "jeepney.io.blocking",
]

# Qt plugins the tray keeps (by folder and file pattern); every other plugin is left out.
QT_PLUGINS_KEPT = {
    "platforms": ["libqxcb.so", "libqoffscreen.so", "libqminimal.so"],
    "platformthemes": ["libqxdgdesktopportal.so"],  # dark/light scheme, portals
    "platforminputcontexts": ["libcomposeplatforminputcontextplugin.so", "libibus*.so"],
    "imageformats": ["libqsvg.so"],  # PNG is built into QtGui
    "iconengines": ["libqsvgicon.so"],  # SVG icons of the desktop's icon theme
    "xcbglintegrations": ["libqxcb-glx-integration.so", "libqxcb-egl-integration.so"],
}
# Qt libraries only the left-out plugins and modules use.
QT_LIBS_DROPPED = [
    "libQt6Pdf*",
    "libQt6Qml*",
    "libQt6Quick*",
    "libQt6VirtualKeyboard*",
    "libQt6Wayland*",
    "libQt6Designer*",
    "libQt6PrintSupport*",
    "libQt6Sql*",
    "libQt6Test*",
    "libQt6Xml*",
    "libQt6Help*",
    "libQt6Multimedia*",
    "libQt6WebEngine*",
    "libQt63D*",
]


def braid_metadata() -> list[tuple[str, str]]:
    """The braid distribution's metadata: ``braid --version`` reads the version from it."""
    from PyInstaller.utils.hooks import copy_metadata

    return copy_metadata("braid")


def keep_qt_entry(dest: str) -> bool:
    """Whether a collected file (by its destination path in the bundle) stays in the tray's."""
    parts = Path(dest).parts
    if "plugins" in parts:
        index = parts.index("plugins")
        if len(parts) > index + 2:
            folder, name = parts[index + 1], parts[-1]
            patterns = QT_PLUGINS_KEPT.get(folder, [])
            return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)
    if "translations" in parts and "PySide6" in parts:
        return False  # Qt's own translations: the tray's texts are its own
    name = parts[-1] if parts else dest
    return not any(fnmatch.fnmatch(name, pattern) for pattern in QT_LIBS_DROPPED)


def prune_unneeded_libraries(binaries: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """Drop shared libraries nothing kept links to (the left-out plugins pulled in GTK and more).

    The roots are the extension modules, the kept Qt plugins and libpython; ``ldd`` lists
    everything each of them loads, transitively.
    """
    from PyInstaller.depend.bindepend import get_imports

    def is_root(entry: tuple[str, str, str]) -> bool:
        dest, _src, kind = entry
        return kind == "EXTENSION" or "plugins" in Path(dest).parts or "libpython" in dest

    needed: set[str] = set()
    for _dest, src, _kind in filter(is_root, binaries):
        needed.update(Path(name).name for name, _path in get_imports(src))
    return [
        entry
        for entry in binaries
        if entry[2] == "SYMLINK" or is_root(entry) or Path(entry[0]).name in needed
    ]


def drop_dangling_links(
    binaries: list[tuple[str, str, str]], datas: list[tuple[str, str, str]]
) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """Symbolic links (PyInstaller's SYMLINK entries) whose target was left out go too."""
    kept = {os.path.normpath(dest) for dest, _src, kind in binaries + datas if kind != "SYMLINK"}

    def target_kept(entry: tuple[str, str, str]) -> bool:
        dest, target, kind = entry
        return (
            kind != "SYMLINK"
            or os.path.normpath(os.path.join(os.path.dirname(dest), target)) in kept
        )

    return [e for e in binaries if target_kept(e)], [e for e in datas if target_kept(e)]


def trim_tray(
    binaries: list[tuple[str, str, str]], datas: list[tuple[str, str, str]]
) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """The tray's files minus unused Qt plugins and libraries and what only they needed."""
    binaries = prune_unneeded_libraries([e for e in binaries if keep_qt_entry(e[0])])
    datas = [e for e in datas if keep_qt_entry(e[0])]
    return drop_dangling_links(binaries, datas)


def strip_interpreter(
    binaries: list[tuple[str, str, str]], workpath: str
) -> list[tuple[str, str, str]]:
    """Stripped copies of the interpreter's own libraries (libpython, lib-dynload).

    A Python built from source keeps its debug symbols (libpython alone is 23 MB with them,
    5 MB without). PyInstaller's strip option is no use here: it strips every binary, and
    stripping the libraries auditwheel patched in numpy's wheel breaks them ("ELF load
    command address/offset not page-aligned").
    """
    strip = shutil.which("strip")
    base = Path(sys.base_prefix).resolve()
    if strip is None:
        return binaries
    out = []
    for dest, src, kind in binaries:
        path = Path(src).resolve()
        if kind in ("BINARY", "EXTENSION") and path.is_relative_to(base):
            copy = Path(workpath) / "stripped" / dest
            if not copy.exists() or copy.stat().st_mtime < path.stat().st_mtime:
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, copy)
                subprocess.run([strip, "--strip-unneeded", str(copy)], check=True)
            src = str(copy)
        out.append((dest, src, kind))
    return out
