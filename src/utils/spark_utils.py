"""Spark helpers: the S3A settings that let Spark read the lake bucket through `s3a://`.

Credentials never go into the Spark conf (it is printed by `spark-submit --verbose`, the
environment tab and our own start-up logs): the JVM reads them from its environment
(`s3a_env`), or from the standard AWS chain when no keys are set.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

from config.config import Settings
from src.errors import ProcessorError

HADOOP_AWS = "org.apache.hadoop:hadoop-aws"
# The v1 names are mapped by S3A; the v2 class names are what hadoop-aws 3.4+ loads natively.
ENV_CREDENTIALS = "software.amazon.awssdk.auth.credentials.EnvironmentVariableCredentialsProvider"
DEFAULT_CREDENTIALS = "software.amazon.awssdk.auth.credentials.DefaultCredentialsProvider"
REDACTION_REGEX = r"(?i)secret|password|token|access[.]?key|credential"


def pyspark_jars_dir() -> Path:
    import pyspark

    return Path(pyspark.__file__).resolve().parent / "jars"


def bundled_hadoop_version(jars_dir: Path | None = None) -> str:
    """The Hadoop version inside the installed pyspark; hadoop-aws must match it exactly."""
    jars_dir = jars_dir or pyspark_jars_dir()
    for jar in sorted(jars_dir.glob("hadoop-client-api-*.jar")):
        match = re.fullmatch(r"hadoop-client-api-(\d+\.\d+\.\d+)\.jar", jar.name)
        if match:
            return match.group(1)
    raise ProcessorError(f"no hadoop-client-api-<version>.jar in {jars_dir}: cannot pick the hadoop-aws version")


def hadoop_aws_package(jars_dir: Path | None = None) -> str:
    return f"{HADOOP_AWS}:{bundled_hadoop_version(jars_dir)}"


def s3a_conf(settings: Settings) -> dict[str, str]:
    """Spark settings for reading `s3a://<S3_BUCKET_NAME>/...`; holds no secret.

    hadoop-aws (and, transitively, the AWS SDK v2 bundle) come from Maven Central into the
    Ivy cache `DATA_DIR/ivy` on the first start, or from local files listed in SPARK_JARS on
    machines without internet.
    """
    conf: dict[str, str] = {}
    if settings.spark_jars:
        conf["spark.jars"] = settings.spark_jars
    else:
        conf["spark.jars.packages"] = hadoop_aws_package()
        conf["spark.jars.ivy"] = str(settings.data_dir / "ivy")
    prefix = "spark.hadoop.fs.s3a."
    conf.update(
        {
            "spark.hadoop.fs.s3a.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem",
            prefix + "endpoint.region": settings.aws_region,
            prefix + "aws.credentials.provider": ENV_CREDENTIALS if settings.aws_access_key_id else DEFAULT_CREDENTIALS,
            prefix + "connection.maximum": str(max(32, settings.max_workers * 4)),
            prefix + "threads.max": str(max(16, settings.max_workers * 2)),
            prefix + "attempts.maximum": "5",
            prefix + "retry.limit": "7",
            prefix + "retry.throttle.limit": "20",
            prefix + "input.stream.type": "classic",
            "spark.redaction.regex": REDACTION_REGEX,
        }
    )
    if settings.s3_endpoint_url:
        url = urlparse(settings.s3_endpoint_url)
        conf[prefix + "endpoint"] = settings.s3_endpoint_url
        conf[prefix + "path.style.access"] = "true"
        conf[prefix + "connection.ssl.enabled"] = "true" if url.scheme == "https" else "false"
    return conf


def s3a_env(settings: Settings) -> dict[str, str]:
    """Environment the Spark JVM needs for S3A credentials; apply before the session starts.

    Keys may come from `.env`, which is not in `os.environ`: the JVM inherits the Python
    process environment at launch, so they must be exported there first.
    """
    env = {"AWS_REGION": settings.aws_region}
    if settings.aws_access_key_id:
        env["AWS_ACCESS_KEY_ID"] = settings.aws_access_key_id.get()
        env["AWS_SECRET_ACCESS_KEY"] = settings.aws_secret_access_key.get()
    return env
