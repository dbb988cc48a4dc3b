"""`chain-spec-replay`: play a rosbag2 bag into ROS 2 and record what the node answers.

    chain-spec-replay BAG --record OUT [--rate 1.0] [--node chain_spec_node] [--wait-timeout 60]

BAG is a rosbag2 directory (sqlite3 or MCAP), read with `rosbags`, so no rosbag2 install is
needed. Every message is republished as its raw CDR bytes (no deserialisation), at its bag time
divided by --rate, with /clock (the bag's own, or one synthesised at 100 Hz when the bag has
none): start the node with use_sim_time true and it runs on the bag's time at any rate.

Before playing, the tool waits until every played topic has a subscriber and every recorded
topic has a publisher (the node is up and its models are loaded). After the last message it
waits until reliable subscribers have acknowledged everything and the node's outputs have gone
quiet, then writes the recorded outputs (coc, trajectory, markers, plan_info, /diagnostics by
default) to OUT as an MCAP bag, stamped with the bag time at which they arrived. OUT's metadata
names BAG, so `chain-spec-report OUT` finds the drive it was planned on.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import threading
import time
from pathlib import Path

from ..constants import NS

CLOCK_TOPIC, CLOCK_TYPE = "/clock", "rosgraph_msgs/msg/Clock"
NODE_OUTPUTS = {"coc": "std_msgs/msg/String", "trajectory": "nav_msgs/msg/Path",
                "markers": "visualization_msgs/msg/MarkerArray", "plan_info": "std_msgs/msg/String"}
DIAGNOSTICS = ("/diagnostics", "diagnostic_msgs/msg/DiagnosticArray")
SOURCE_KEY = "chain_spec.source_bag"


def default_record_topics(node: str = "chain_spec_node") -> dict[str, str]:
    node = node.strip("/")
    topics = {f"/{node}/{name}": msgtype for name, msgtype in NODE_OUTPUTS.items()}
    topics[DIAGNOSTICS[0]] = DIAGNOSTICS[1]
    return topics


def message_class(msgtype: str):
    """'pkg/msg/Name' -> the rclpy message class."""
    package, _, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{package}.msg"), name)


def load_bag(path: Path, start: float = 0.0, duration: float | None = None):
    """(topics {name: type}, [(stamp_ns, topic, raw bytes)] sorted by stamp)."""
    from rosbags.rosbag2 import Reader

    if not Path(path).exists():
        raise FileNotFoundError(f"bag not found: {path}")
    try:
        with Reader(path) as reader:
            topics = {c.topic: c.msgtype for c in reader.connections}
            begin = reader.start_time + int(start * NS)
            end = begin + int(duration * NS) if duration is not None else None
            messages = [(stamp, connection.topic, bytes(raw)) for connection, stamp, raw in reader.messages()
                        if stamp >= begin and (end is None or stamp <= end)]
    except Exception as error:  # noqa: BLE001 - rosbags raises its own error types
        raise ValueError(f"{path}: cannot read the bag: {type(error).__name__}: {error}") from None
    messages.sort(key=lambda m: m[0])
    return topics, messages


def synthesise_clock(messages, rate_hz: float = 100.0):
    """/clock messages at rate_hz over the span of `messages` (for bags without /clock)."""
    from rclpy.serialization import serialize_message
    from rosgraph_msgs.msg import Clock

    if not messages:
        return []
    first, last = messages[0][0], messages[-1][0]
    step = int(NS / rate_hz)
    out = []
    for stamp in range(first, last + 1, step):
        clock = Clock()
        clock.clock.sec, clock.clock.nanosec = stamp // NS, stamp % NS
        out.append((stamp, CLOCK_TOPIC, serialize_message(clock)))
    return out


class Recorder:
    """Raw subscriptions to the node's outputs; keeps (bag time, topic, raw bytes)."""

    def __init__(self, node, topics: dict[str, str], clock):
        from rclpy.qos import QoSProfile, ReliabilityPolicy

        self.topics, self._clock = topics, clock
        self.messages: list[tuple[int, str, bytes]] = []
        self.last_arrival = time.monotonic()
        self._lock = threading.Lock()
        qos = QoSProfile(depth=200, reliability=ReliabilityPolicy.RELIABLE)
        self._subscriptions = [node.create_subscription(message_class(msgtype), topic,
                                                        lambda raw, topic=topic: self._on(topic, raw), qos, raw=True)
                               for topic, msgtype in topics.items()]

    def _on(self, topic: str, raw: bytes) -> None:
        with self._lock:
            self.messages.append((self._clock(), topic, bytes(raw)))
            self.last_arrival = time.monotonic()

    def counts(self) -> dict[str, int]:
        with self._lock:
            out = dict.fromkeys(self.topics, 0)
            for _, topic, _ in self.messages:
                out[topic] += 1
        return out

    def write(self, out: Path, source: Path | None) -> None:
        from rosbags.rosbag2 import StoragePlugin, Writer

        from ..data.bag import ros2_typestore

        typestore = ros2_typestore()
        with self._lock:
            messages = sorted(self.messages, key=lambda m: m[0])
        with Writer(out, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
            if source is not None:
                writer.set_custom_data(SOURCE_KEY, str(Path(source).resolve()))
            connections = {topic: writer.add_connection(topic, msgtype, typestore=typestore)
                           for topic, msgtype in self.topics.items()}
            for stamp, topic, raw in messages:
                writer.write(connections[topic], stamp, raw)


def replay(bag: Path, record: Path | None = None, rate: float = 1.0, node_name: str = "chain_spec_node",
           record_topics: dict[str, str] | None = None, wait_timeout: float = 60.0, wait: bool = True,
           settle: float = 1.5, linger: float = 10.0, start: float = 0.0, duration: float | None = None,
           log=print) -> dict:
    """Play `bag` and record the node's outputs. Returns a summary dict (raises on timeouts)."""
    import rclpy
    from rclpy.duration import Duration
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    if rate <= 0:
        raise ValueError("rate must be positive")
    if record is not None and Path(record).exists():
        raise FileExistsError(f"{record} exists; choose a new output directory")
    topics, messages = load_bag(bag, start, duration)
    if not messages:
        raise ValueError(f"{bag}: no messages to play")
    if CLOCK_TOPIC not in topics:
        messages = sorted(messages + synthesise_clock(messages), key=lambda m: m[0])
        topics[CLOCK_TOPIC] = CLOCK_TYPE
    record_topics = record_topics if record_topics is not None else default_record_topics(node_name)

    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("chain_spec_replay", context=context)
    sim_now = [messages[0][0]]
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    try:
        qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        publishers, skipped = {}, []
        for topic, msgtype in topics.items():
            try:
                publishers[topic] = node.create_publisher(message_class(msgtype), topic, qos)
            except (ImportError, AttributeError, ValueError):
                skipped.append(f"{topic} ({msgtype})")
        if skipped:
            log(f"chain-spec-replay: no ROS message type installed for {', '.join(skipped)}; not played")
        recorder = Recorder(node, record_topics, lambda: sim_now[0]) if record is not None else None
        spinner.start()

        if wait:
            deadline = time.monotonic() + wait_timeout
            while True:
                missing = [t for t, p in publishers.items() if t != CLOCK_TOPIC and p.get_subscription_count() == 0]
                if recorder is not None:
                    missing += [f"publisher of {t}" for t in record_topics if node.count_publishers(t) == 0]
                if not missing:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"after {wait_timeout:g} s still waiting for: {', '.join(missing)} "
                                       f"(is the node running on this ROS_DOMAIN_ID?)")
                time.sleep(0.1)
            time.sleep(0.3)  # let discovery settle on both sides

        first = messages[0][0]
        log(f"chain-spec-replay: playing {len(messages)} messages, {(messages[-1][0] - first) / NS:.1f} s "
            f"at rate {rate:g}")
        wall0 = time.monotonic()
        published = dict.fromkeys(publishers, 0)
        for stamp, topic, raw in messages:
            publisher = publishers.get(topic)
            if publisher is None:
                continue
            delay = wall0 + (stamp - first) / NS / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sim_now[0] = stamp
            publisher.publish(raw)
            published[topic] += 1
        played_s = time.monotonic() - wall0

        for publisher in publishers.values():
            publisher.wait_for_all_acked(Duration(seconds=5.0))
        if recorder is not None:
            end = time.monotonic() + linger
            while time.monotonic() < end and time.monotonic() - recorder.last_arrival < settle:
                time.sleep(0.05)
            recorder.write(Path(record), bag)
        summary = {"bag": str(bag), "rate": rate, "played_s": played_s, "published": published,
                   "recorded": recorder.counts() if recorder else {}, "record": str(record) if record else None}
        return summary
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=context)
        spinner.join(timeout=2.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chain-spec-replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bag", type=Path, help="rosbag2 directory (sqlite3 or MCAP)")
    parser.add_argument("--record", type=Path, help="write the node's outputs to this new MCAP bag directory")
    parser.add_argument("--rate", type=float, default=1.0, help="playback speed factor (default 1.0)")
    parser.add_argument("--node", default="chain_spec_node", help="name of the node whose outputs to record")
    parser.add_argument("--topic", action="append", default=[], metavar="NAME=TYPE",
                        help="record this topic too (e.g. /foo=std_msgs/msg/String); repeatable")
    parser.add_argument("--wait-timeout", type=float, default=60.0, help="seconds to wait for the node")
    parser.add_argument("--no-wait", action="store_true", help="start playing without waiting for subscribers")
    parser.add_argument("--start", type=float, default=0.0, help="skip this many seconds of the bag")
    parser.add_argument("--duration", type=float, help="play only this many seconds")
    parser.add_argument("--settle", type=float, default=1.5,
                        help="after playing, stop recording once outputs were quiet this long (s)")
    args = parser.parse_args(argv)
    topics = default_record_topics(args.node)
    for item in args.topic:
        name, _, msgtype = item.partition("=")
        if not msgtype:
            parser.error(f"--topic {item!r}: expected NAME=TYPE")
        topics[name] = msgtype
    try:
        summary = replay(args.bag, args.record, args.rate, args.node, topics if args.record else None,
                         args.wait_timeout, not args.no_wait, args.settle, start=args.start,
                         duration=args.duration)
    except (FileNotFoundError, FileExistsError, ValueError, TimeoutError) as error:
        print(f"chain-spec-replay: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(f"chain-spec-replay: played {sum(summary['published'].values())} messages in {summary['played_s']:.1f} s")
    for topic, count in summary["recorded"].items():
        print(f"  recorded {count:5d}  {topic}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
