"""What a local Flink cluster is made of, fetched once into a cache folder.

- Flink's distribution is not a Maven artifact; PyPI's `apache-flink-libraries` sdist carries `flink-dist` and the
  other `lib/` jars, and the `apache-flink` wheel the `bin/` scripts and `conf/`. Both pin old Beam versions, so they
  are unpacked here, never installed beside the project.
- Beam's Flink job server is the `beam-runners-flink-<flink>` artifact and its dependencies in one jar (what Beam
  publishes as `beam-runners-flink-<flink>-job-server`). Maven Central, as this project's machines reach it, serves no
  job-server jar for any Beam release, and the runner with all its dependencies only for Beam 2.62.0 (2.70.0 lacks
  `beam-runners-java-job-service`): the jar is shaded here from that, with Maven. A 2.62.0 job server runs pipelines
  of the 2.77 Python SDK (the Job API is versioned; the tests run every scenario through this pair).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

FLINK_VERSION = "1.19.3"  # a Flink Beam 2.77 (--flink_version) and the job server below both support
FLINK_MINOR = FLINK_VERSION.rsplit(".", 1)[0]
JOB_SERVER_BEAM_VERSION = "2.62.0"
DEFAULT_CACHE = os.environ.get("FLINK_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                   "beam-image-embeddings", "flink")

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.beam-image-embeddings</groupId>
  <artifactId>beam-runners-flink-{minor}-job-server</artifactId>
  <version>{beam}</version>
  <properties><project.build.sourceEncoding>UTF-8</project.build.sourceEncoding></properties>
  <dependencies>
    <dependency>
      <groupId>org.apache.beam</groupId>
      <artifactId>beam-runners-flink-{minor}</artifactId>
      <version>{beam}</version>
    </dependency>
  </dependencies>
  <build>
    <plugins>
      <plugin>
        <groupId>org.apache.maven.plugins</groupId>
        <artifactId>maven-shade-plugin</artifactId>
        <version>3.6.0</version>
        <executions>
          <execution>
            <phase>package</phase>
            <goals><goal>shade</goal></goals>
            <configuration>
              <filters>
                <filter>
                  <artifact>*:*</artifact>
                  <excludes>
                    <exclude>META-INF/*.SF</exclude>
                    <exclude>META-INF/*.DSA</exclude>
                    <exclude>META-INF/*.RSA</exclude>
                  </excludes>
                </filter>
              </filters>
              <transformers>
                <transformer implementation="org.apache.maven.plugins.shade.resource.ServicesResourceTransformer"/>
                <transformer implementation="org.apache.maven.plugins.shade.resource.ManifestResourceTransformer">
                  <mainClass>org.apache.beam.runners.flink.FlinkJobServerDriver</mainClass>
                </transformer>
              </transformers>
            </configuration>
          </execution>
        </executions>
      </plugin>
    </plugins>
  </build>
</project>
"""


class FlinkSetupError(RuntimeError):
    """A part of the local cluster could not be fetched or built."""


def _run(command: list[str], what: str, cwd: str | None = None) -> None:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise FlinkSetupError(f"{what} needs `{command[0]}`, which is not installed here.") from None
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise FlinkSetupError(f"{what} failed ({' '.join(command)}):\n{tail}")


def _publish(built: str, final: str) -> str:
    """Moves a finished build into place in one step, so a crash never leaves half a cache entry."""
    try:
        os.rename(built, final)
    except OSError:  # built meanwhile by another process: keep theirs
        shutil.rmtree(built, ignore_errors=True)
    return final


def flink_home(cache: str = DEFAULT_CACHE) -> str:
    """FLINK_HOME of Flink FLINK_VERSION (bin/, lib/, conf/), unpacked from PyPI's files on first use."""
    home = os.path.join(os.path.abspath(cache), f"flink-{FLINK_VERSION}")
    if os.path.isfile(os.path.join(home, "lib", f"flink-dist-{FLINK_VERSION}.jar")):
        return home
    os.makedirs(cache, exist_ok=True)
    print(f"Fetching Flink {FLINK_VERSION} from PyPI into {cache} (once; about 230 MB) ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=cache) as work:
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", work,
              f"apache-flink-libraries=={FLINK_VERSION}"], "Downloading apache-flink-libraries from PyPI")
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
              "--python-version", "3.11", "--dest", work, f"apache-flink=={FLINK_VERSION}"],
             "Downloading apache-flink from PyPI")
        built = os.path.join(work, "home")
        [sdist] = [n for n in os.listdir(work) if n.startswith("apache-flink-libraries")]
        with tarfile.open(os.path.join(work, sdist)) as archive:
            archive.extractall(work, filter="data")
        deps = os.path.join(work, f"apache-flink-libraries-{FLINK_VERSION}", "deps")
        shutil.copytree(os.path.join(deps, "lib"), os.path.join(built, "lib"))
        [wheel] = [n for n in os.listdir(work) if n.endswith(".whl")]
        with zipfile.ZipFile(os.path.join(work, wheel)) as archive:
            for member in archive.namelist():
                if member.startswith(("pyflink/bin/", "pyflink/conf/")) and not member.endswith("/"):
                    target = os.path.join(built, member[len("pyflink/"):])
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    with archive.open(member) as source, open(target, "wb") as out:
                        shutil.copyfileobj(source, out)
        shutil.copy(os.path.join(deps, "bin", "bash-java-utils.jar"), os.path.join(built, "bin"))
        for name in os.listdir(os.path.join(built, "bin")):
            os.chmod(os.path.join(built, "bin", name), 0o755)
        os.makedirs(os.path.join(built, "log"))
        os.makedirs(os.path.join(built, "plugins"))
        return _publish(built, home)


def job_server_jar(cache: str = DEFAULT_CACHE) -> str:
    """Beam's Flink job server for FLINK_MINOR, shaded from Maven Central's artifacts on first use."""
    jar = os.path.join(os.path.abspath(cache), f"beam-runners-flink-{FLINK_MINOR}-job-server-{JOB_SERVER_BEAM_VERSION}.jar")
    if os.path.isfile(jar):
        return jar
    os.makedirs(cache, exist_ok=True)
    print(f"Building Beam's Flink job server {JOB_SERVER_BEAM_VERSION} with Maven into {cache} (once; 1-2 minutes) ...",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=cache) as work:
        with open(os.path.join(work, "pom.xml"), "w") as f:
            f.write(_POM.format(minor=FLINK_MINOR, beam=JOB_SERVER_BEAM_VERSION))
        _run(["mvn", "--batch-mode", "--quiet", "package"], "Building Beam's Flink job server with Maven", cwd=work)
        built = os.path.join(work, "target", os.path.basename(jar))
        os.replace(built, jar)
    return jar
