"""Synthetic nova notifications for demos, smoke and load tests.

:func:`notifications` simulates a small nova cloud: tenants create
instances, rename them, resize them and delete them, and the usage audit
reports them (``compute.instance.exists``). Every step comes out as the bare
oslo.messaging (v1) notification dict nova would emit, with the same keys,
value formats and sizes as real ones (mostly 2.2-3.2 KB, scheduler events
about 5 KB). Several operations run at once and their events interleave, as
they do on a real bus; the events of one operation share a request id, and
timestamps only go forward.

Sending them to a broker is :func:`shoebox_worker.tools.publish.publish`'s
job; the envelope they go in is
:func:`shoebox_worker.consume.envelope.wrap`'s.

The same seed and start give the same stream, byte for byte.
"""

import base64
import datetime
import random
import uuid
from collections.abc import Iterator

import orjson

__all__ = [
    "EVENT_TYPES",
    "notifications",
]

#: Every event type :func:`notifications` emits.
EVENT_TYPES = frozenset({
    "scheduler.run_instance.start",
    "scheduler.run_instance.scheduled",
    "scheduler.run_instance.end",
    "compute.instance.update",
    "compute.instance.create.start",
    "compute.instance.create.end",
    "compute.instance.exists",
    "compute.instance.resize.prep.start",
    "compute.instance.resize.prep.end",
    "compute.instance.resize.start",
    "compute.instance.resize.end",
    "compute.instance.finish_resize.start",
    "compute.instance.finish_resize.end",
    "compute.instance.resize.confirm.start",
    "compute.instance.resize.confirm.end",
    "compute.instance.delete.start",
    "compute.instance.shutdown.start",
    "compute.instance.shutdown.end",
    "compute.instance.delete.end",
})

# name, flavorid, id, memory_mb, vcpus, root_gb, ephemeral_gb, swap,
# rxtx_factor, vcpu_weight, popularity
_FLAVORS = (
    ("512MB Standard Instance", "2", 2, 512, 1, 20, 0, 512, "80.0", 10, 30),
    ("1GB Standard Instance", "3", 3, 1024, 1, 40, 0, 1024, "120.0", 10, 16),
    ("2GB Standard Instance", "4", 4, 2048, 2, 80, 0, 2048, "240.0", 20, 10),
    ("4GB Standard Instance", "5", 5, 4096, 2, 160, 0, 2048, "400.0", 40, 5),
    ("8GB Standard Instance", "6", 6, 8192, 4, 320, 0, 2048, "600.0", 80, 5),
    ("15GB Standard Instance", "7", 7, 15360, 6, 620, 0, 2048, "800.0", 150,
     3),
    ("1 GB Performance", "performance1-1", 9, 1024, 1, 20, 0, 0, "200.0", 10,
     8),
    ("2 GB Performance", "performance1-2", 10, 2048, 2, 40, 20, 0, "400.0",
     20, 6),
    ("4 GB Performance", "performance1-4", 11, 4096, 4, 40, 40, 0, "800.0",
     40, 12),
    ("8 GB Performance", "performance1-8", 12, 8192, 8, 40, 80, 0, "1600.0",
     80, 3),
    ("60 GB Performance", "performance2-60", 15, 61440, 16, 40, 600, 0,
     "5000.0", 600, 2),
)

# os_distro, org.openstack__1__os_distro, os_version, os_type, min_disk,
# min_ram, image extras, popularity
_DISTROS = (
    ("ubuntu", "com.ubuntu", "12.04", "linux", 20, 512,
     {"auto_disk_config": "True"}, 20),
    ("ubuntu", "com.ubuntu", "14.04", "linux", 20, 512,
     {"auto_disk_config": "disabled", "vm_mode": "hvm"}, 25),
    ("debian", "org.debian", "7", "linux", 20, 512,
     {"auto_disk_config": "disabled", "vm_mode": "hvm"}, 10),
    ("centos", "org.centos", "6.5", "linux", 20, 512,
     {"auto_disk_config": "True"}, 18),
    ("centos", "org.centos", "5.10", "linux", 20, 512,
     {"auto_disk_config": "True"}, 4),
    ("rhel", "com.redhat", "6.5", "linux", 20, 512,
     {"auto_disk_config": "True"}, 6),
    ("fedora", "org.fedoraproject", "20", "linux", 20, 512,
     {"auto_disk_config": "disabled", "vm_mode": "hvm"}, 4),
    ("windows", "com.microsoft.server", "2008.2", "windows", 40, 1024,
     {"auto_disk_config": "False"}, 8),
    ("windows", "com.microsoft.server", "2012", "windows", 40, 1024,
     {"auto_disk_config": "False"}, 5),
)

_ROLE_SETS = (
    ["compute:default", "object-store:default", "identity:user-admin"],
    ["admin", "compute:default", "object-store:default", "identity:default"],
    ["identity:user-admin", "object-store:default", "compute:default",
     "dbaas:default", "admin"],
    ["object-store:default", "compute:default", "identity:default"],
    ["member", "compute:default", "object-store:default"],
)

_NAME_PARTS = (
    "web", "db", "app", "api", "cache", "worker", "jenkins", "build", "lb",
    "mongo", "mysql", "redis", "es", "kafka", "zk", "mail", "vpn", "bastion",
    "test", "staging", "prod", "dev", "wp", "ci", "monitor", "log")

_ALPHANUM = "abcdefghijklmnopqrstuvwxyz0123456789"

_DISTRO_NAMES = {
    "ubuntu": "Ubuntu", "debian": "Debian", "centos": "CentOS",
    "rhel": "Red Hat Enterprise Linux", "fedora": "Fedora",
    "windows": "Windows Server",
}

_MIDNIGHT = datetime.time(0, 0)

# Seconds the simulated clock moves between two events (mean).
_MEAN_GAP = 0.25


def _fmt(moment):
    """Format a datetime the way nova writes times: microseconds always."""
    return (f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d} "
            f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}."
            f"{moment.microsecond:06d}")


def _fmt_s(moment):
    """Format a database time (nova stores whole seconds)."""
    return (f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d} "
            f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}"
            ".000000")


class _Flavor:
    __slots__ = (
        "ephemeral_gb",
        "flavorid",
        "id",
        "memory_mb",
        "name",
        "root_gb",
        "rxtx_factor",
        "swap",
        "vcpu_weight",
        "vcpus",
    )

    def __init__(self, name, flavorid, id_, memory_mb, vcpus, root_gb,
                 ephemeral_gb, swap, rxtx_factor, vcpu_weight):
        self.name = name
        self.flavorid = flavorid
        self.id = id_
        self.memory_mb = memory_mb
        self.vcpus = vcpus
        self.root_gb = root_gb
        self.ephemeral_gb = ephemeral_gb
        self.swap = swap
        self.rxtx_factor = rxtx_factor
        self.vcpu_weight = vcpu_weight

    def system_metadata(self):
        """The ``instance_type_*`` keys nova copies into image properties."""
        return {
            "instance_type_ephemeral_gb": str(self.ephemeral_gb),
            "instance_type_flavorid": self.flavorid,
            "instance_type_id": str(self.id),
            "instance_type_memory_mb": str(self.memory_mb),
            "instance_type_name": self.name,
            "instance_type_root_gb": str(self.root_gb),
            "instance_type_rxtx_factor": self.rxtx_factor,
            "instance_type_swap": str(self.swap),
            "instance_type_vcpu_weight": str(self.vcpu_weight),
            "instance_type_vcpus": str(self.vcpus),
        }


_FLAVOR_LIST = tuple(_Flavor(*row[:-1]) for row in _FLAVORS)
_FLAVOR_WEIGHTS = tuple(row[-1] for row in _FLAVORS)


class _Tenant:
    __slots__ = (
        "auth_token",
        "glance_api_servers",
        "project_id",
        "remote_address",
        "roles",
        "user_id",
        "user_name",
    )


class _Image:
    __slots__ = (
        "architecture",
        "checksum",
        "created_at",
        "glance",
        "id",
        "meta",
        "min_disk",
        "min_ram",
        "name",
        "os_type",
        "owner",
        "size",
    )


class _Instance:
    __slots__ = (
        "access_ip_v4",
        "access_ip_v6",
        "bw_private",
        "bw_public",
        "created_at",
        "db_id",
        "display_name",
        "fixed_ips",
        "flavor",
        "host",
        "hostname",
        "image",
        "launched_at",
        "metadata",
        "node",
        "reservation_id",
        "task_state",
        "tenant",
        "uuid",
        "vm_state",
    )


class _Cloud:
    """The simulated cloud: tenants, hosts, images, live instances, a clock.

    :param rng: the ``random.Random`` every choice comes from.
    :param start: naive UTC datetime of the first event.
    """

    def __init__(self, rng, start):
        self.rng = rng
        self.now = start
        rnd = rng.random
        self.region = rng.choice(("dfw1", "ord1", "iad3", "lon3", "syd2"))
        self.hosts = [f"c-{self.region}-{i:03d}"
                      for i in rng.sample(range(1, 400), 48)]
        self.scheduler_hosts = [f"sched-{self.region}-{i:02d}"
                                for i in (1, 2, 3)]
        self.glance = [self.private_v4() for _ in range(3)]
        api = [self.private_v4() for _ in range(4)]
        self.tenants = []
        for _ in range(80):
            tenant = _Tenant()
            tenant.project_id = str(rng.randrange(100000, 1000000))
            if rnd() < 0.6:
                tenant.user_id = self.hex()
                tenant.user_name = str(rng.randrange(100000, 1000000))
            else:
                tenant.user_id = str(rng.randrange(100000, 1000000))
                tenant.user_name = tenant.user_id
            tenant.roles = list(rng.choice(_ROLE_SETS))
            tenant.auth_token = self.hex()
            tenant.remote_address = rng.choice(api)
            tenant.glance_api_servers = (
                [f"{rng.choice(self.glance)}:9292"] if rnd() < 0.3 else None)
            self.tenants.append(tenant)
        self.base_images = [self._base_image(spec) for spec in _DISTROS]
        self.distro_weights = [spec[-1] for spec in _DISTROS]
        self.instances = {}
        self.busy = set()
        self.next_db_id = rng.randrange(100000, 900000)
        # Instances that were running before the stream started.
        for _ in range(rng.randrange(80, 160)):
            self._add_existing()

    # -- small random values -------------------------------------------------

    def uuid(self):
        return uuid.UUID(int=self.rng.getrandbits(128), version=4)

    def hex(self):
        return self.uuid().hex

    def tick(self):
        """Move the clock forward a little and return the new time."""
        gap = self.rng.expovariate(1.0 / _MEAN_GAP)
        self.now += datetime.timedelta(microseconds=max(1, int(gap * 1e6)))
        return self.now

    def node(self, host):
        """The hypervisor node name of a compute host."""
        return f"{host}.{self.region}.example.net"

    def public_v4(self):
        # Documentation ranges (RFC 5737): realistic, never anyone's address.
        rng = self.rng
        prefix = rng.choice(("198.51.100", "203.0.113", "192.0.2"))
        return f"{prefix}.{rng.randrange(2, 255)}"

    def public_v6(self):
        rng = self.rng
        return "2001:db8:" + ":".join(
            f"{rng.randrange(1, 0x10000):x}" for _ in range(6))

    def private_v4(self):
        rng = self.rng
        return (f"10.{rng.randrange(176, 192)}.{rng.randrange(256)}."
                f"{rng.randrange(2, 255)}")

    # -- images and instances --------------------------------------------

    def _base_image(self, spec):
        (distro, org_distro, version, os_type, min_disk, min_ram, extra,
         _popularity) = spec
        rng = self.rng
        image = _Image()
        image.id = str(self.uuid())
        image.name = f"{_DISTRO_NAMES[distro]} {version}"
        image.os_type = os_type
        image.architecture = "x64" if rng.random() < 0.9 else None
        image.min_disk = min_disk
        image.min_ram = min_ram
        image.checksum = self.hex()
        image.size = rng.randrange(200, 9000) * 1000003
        image.glance = rng.choice(self.glance)
        image.created_at = _fmt_s(self.now - datetime.timedelta(
            days=rng.randrange(30, 700), seconds=rng.randrange(86400)))
        image.owner = None
        meta = dict(extra)
        meta.update({
            "base_image_ref": image.id,
            "cache_in_nova": "True",
            "container_format": "ovf",
            "disk_format": "vhd",
            "image_type": "base",
            "min_disk": str(min_disk),
            "min_ram": str(min_ram),
            "org.openstack__1__architecture": "x64",
            "org.openstack__1__os_distro": org_distro,
            "org.openstack__1__os_version": version,
            "os_distro": distro,
            "os_type": os_type,
        })
        image.meta = meta
        return image

    def _snapshot_image(self, tenant, base):
        """A customer snapshot of an instance built from ``base``."""
        rng = self.rng
        flavor = rng.choices(_FLAVOR_LIST, _FLAVOR_WEIGHTS)[0]
        image = _Image()
        image.id = str(self.uuid())
        image.name = (f"{rng.choice(_NAME_PARTS)}-snapshot-"
                      f"{rng.randrange(1, 60)}")
        image.os_type = base.os_type
        image.architecture = base.architecture
        image.min_disk = max(base.min_disk, flavor.root_gb)
        image.min_ram = base.min_ram
        image.checksum = self.hex()
        image.size = rng.randrange(800, 40000) * 1000003
        image.glance = rng.choice(self.glance)
        image.created_at = _fmt_s(self.now - datetime.timedelta(
            days=rng.randrange(1, 300), seconds=rng.randrange(86400)))
        image.owner = tenant.project_id
        meta = {key: value for key, value in base.meta.items()
                if key != "cache_in_nova"}
        meta.update(flavor.system_metadata())
        meta.update({
            "image_type": "snapshot",
            "instance_uuid": str(self.uuid()),
            "min_disk": str(image.min_disk),
            "network_allocated": "True",
            "user_id": tenant.user_id,
            "xenapi_image_compression_level": "1",
        })
        image.meta = meta
        return image

    def _new_instance(self, tenant):
        rng = self.rng
        inst = _Instance()
        inst.uuid = str(self.uuid())
        inst.db_id = self.next_db_id
        self.next_db_id += rng.randrange(1, 40)
        inst.tenant = tenant
        name = f"{rng.choice(_NAME_PARTS)}-{rng.choice(_NAME_PARTS)}"
        if rng.random() < 0.7:
            name = f"{name}-{rng.randrange(1, 100):02d}"
        elif rng.random() < 0.5:
            name = name + "." + rng.choice(("example.com", "example.net",
                                            "example.org"))
        inst.display_name = name
        inst.hostname = name.split(".")[0]
        inst.host = rng.choice(self.hosts)
        inst.node = self.node(inst.host)
        base = rng.choices(self.base_images, self.distro_weights)[0]
        flavor = rng.choices(_FLAVOR_LIST, _FLAVOR_WEIGHTS)[0]
        if base.os_type == "windows":
            while flavor.memory_mb < 1024:
                flavor = rng.choices(_FLAVOR_LIST, _FLAVOR_WEIGHTS)[0]
        inst.flavor = flavor
        if rng.random() < 0.4:
            inst.image = self._snapshot_image(tenant, base)
        else:
            inst.image = base
        inst.reservation_id = "r-" + "".join(rng.choices(_ALPHANUM, k=8))
        inst.access_ip_v4 = None
        inst.access_ip_v6 = None
        inst.fixed_ips = []
        inst.created_at = ""
        inst.launched_at = ""
        inst.vm_state = "building"
        inst.task_state = None
        inst.metadata = {}
        inst.bw_private = [0, 0]
        inst.bw_public = [0, 0]
        return inst

    def _network(self, inst):
        v4, v6, private = self.public_v4(), self.public_v6(), self.private_v4()
        inst.access_ip_v4 = v4
        inst.access_ip_v6 = v6
        fixed = [
            {"address": v6, "floating_ips": [], "label": "public", "meta": {},
             "type": "fixed", "version": 6},
            {"address": v4, "floating_ips": [], "label": "public", "meta": {},
             "type": "fixed", "version": 4},
            {"address": private, "floating_ips": [], "label": "private",
             "meta": {}, "type": "fixed", "version": 4},
        ]
        if self.rng.random() < 0.5:
            fixed[0], fixed[1] = fixed[1], fixed[0]
        inst.fixed_ips = fixed

    def _add_existing(self):
        rng = self.rng
        inst = self._new_instance(rng.choice(self.tenants))
        created = self.now - datetime.timedelta(
            days=rng.randrange(0, 400), seconds=rng.randrange(86400))
        inst.created_at = _fmt_s(created)
        inst.launched_at = _fmt_s(created + datetime.timedelta(
            seconds=rng.randrange(40, 600)))
        inst.vm_state = "active"
        inst.task_state = None
        self._network(inst)
        if rng.random() < 0.15:
            inst.metadata = {rng.choice(("role", "owner", "env")):
                             rng.choice(_NAME_PARTS)}
        inst.bw_private = [rng.randrange(10 ** 9), rng.randrange(10 ** 9)]
        inst.bw_public = [rng.randrange(10 ** 10), rng.randrange(10 ** 10)]
        self.instances[inst.uuid] = inst

    def idle_instances(self, states=("active",)):
        busy = self.busy
        return [inst for inst in self.instances.values()
                if inst.uuid not in busy and inst.vm_state in states]

    # -- notification building ----------------------------------------------

    def context(self, tenant, admin=False):
        """The ``_context_*`` keys of one request, in nova's spelling."""
        request_id = f"req-{self.uuid()}"
        timestamp = _fmt(self.now)
        if admin:
            # The periodic usage audit runs with an admin context of its own.
            auth_token, remote, roles, glance = None, None, ["admin"], None
        else:
            auth_token = tenant.auth_token
            remote = tenant.remote_address
            roles = list(tenant.roles)
            glance = (list(tenant.glance_api_servers)
                      if tenant.glance_api_servers else None)
        return {
            "_context_auth_token": auth_token,
            "_context_glance_api_servers": glance,
            "_context_instance_lock_checked": False,
            "_context_is_admin": admin,
            "_context_project_id": tenant.project_id,
            "_context_project_name": tenant.project_id,
            "_context_quota_class": None,
            "_context_read_deleted": "no",
            "_context_remote_address": remote,
            "_context_request_id": request_id,
            "_context_roles": roles,
            "_context_tenant": tenant.project_id,
            "_context_timestamp": timestamp,
            "_context_user": tenant.user_id,
            "_context_user_id": tenant.user_id,
            "_context_user_name": tenant.user_name,
        }

    def notify(self, context, event_type, payload, publisher):
        """One notification, stamped with the (advanced) clock."""
        notification = dict(context)
        # Each notification owns all of its lists: callers may change them.
        notification["_context_roles"] = list(context["_context_roles"])
        if context["_context_glance_api_servers"] is not None:
            notification["_context_glance_api_servers"] = list(
                context["_context_glance_api_servers"])
        notification["_unique_id"] = self.hex()
        notification["event_type"] = event_type
        notification["message_id"] = str(self.uuid())
        notification["payload"] = payload
        notification["priority"] = "INFO"
        notification["publisher_id"] = publisher
        notification["timestamp"] = _fmt(self.tick())
        return notification

    def info(self, inst, **extra):
        """nova's ``info_from_instance``: the payload of instance events."""
        flavor = inst.flavor
        image = inst.image
        tenant = inst.tenant
        payload = {
            "access_ip_v4": inst.access_ip_v4,
            "access_ip_v6": inst.access_ip_v6,
            "architecture": image.architecture,
            "availability_zone": None,
            "created_at": inst.created_at,
            "deleted_at": "",
            "disk_gb": flavor.root_gb + flavor.ephemeral_gb,
            "display_name": inst.display_name,
            "ephemeral_gb": flavor.ephemeral_gb,
            "host": inst.host,
            "hostname": inst.hostname,
            "image_meta": dict(image.meta),
            "image_ref_url": (f"http://{image.glance}:9292/images/"
                              f"{image.id}"),
            "instance_flavor_id": flavor.flavorid,
            "instance_id": inst.uuid,
            "instance_type": flavor.name,
            "instance_type_id": flavor.id,
            "kernel_id": "",
            "launched_at": inst.launched_at,
            "memory_mb": flavor.memory_mb,
            "metadata": dict(inst.metadata),
            "node": inst.node,
            "os_type": image.os_type,
            "ramdisk_id": "",
            "reservation_id": inst.reservation_id,
            "root_gb": flavor.root_gb,
            "state": inst.vm_state,
            "state_description": inst.task_state or "",
            "tenant_id": tenant.project_id,
            "terminated_at": "",
            "user_id": tenant.user_id,
            "vcpus": flavor.vcpus,
        }
        if extra:
            payload.update(extra)
        return payload

    def fixed_ips(self, inst):
        return [dict(ip, floating_ips=[], meta={}) for ip in inst.fixed_ips]

    def audit_period(self, current):
        """Usage audit bounds: the day so far, or the whole previous day."""
        today = datetime.datetime.combine(self.now.date(), _MIDNIGHT)
        if current:
            return _fmt_s(today), _fmt_s(self.now)
        return _fmt_s(today - datetime.timedelta(days=1)), _fmt_s(today)

    def update(self, context, inst, new_task_state, new_vm_state=None,
               publisher=None, **extra):
        """A ``compute.instance.update`` for a state or task change."""
        old_state = inst.vm_state
        old_task_state = inst.task_state
        if new_vm_state is not None:
            inst.vm_state = new_vm_state
        inst.task_state = new_task_state
        if old_state == inst.vm_state and self.rng.random() < 0.6:
            # The conductor often does not know the old vm_state.
            old_state = None
        begin, end = self.audit_period(current=True)
        payload = self.info(
            inst,
            audit_period_beginning=begin,
            audit_period_ending=end,
            bandwidth={},
            new_task_state=new_task_state,
            old_state=old_state,
            old_task_state=old_task_state,
            **extra)
        return self.notify(context, "compute.instance.update", payload,
                           publisher or f"compute.{inst.host}")

    def exists(self, context, inst, current):
        """A ``compute.instance.exists`` usage record."""
        rng = self.rng
        for counters, scale in ((inst.bw_private, 10 ** 6),
                                (inst.bw_public, 10 ** 7)):
            counters[0] += int(rng.expovariate(1.0 / scale))
            counters[1] += int(rng.expovariate(1.0 / scale))
        begin, end = self.audit_period(current)
        bandwidth = {
            "private": {"bw_in": inst.bw_private[0],
                        "bw_out": inst.bw_private[1]},
            "public": {"bw_in": inst.bw_public[0],
                       "bw_out": inst.bw_public[1]},
        }
        payload = self.info(inst, audit_period_beginning=begin,
                            audit_period_ending=end, bandwidth=bandwidth)
        return self.notify(context, "compute.instance.exists", payload,
                           f"compute.{inst.host}")

    def request_spec(self, inst):
        """The scheduler's ``request_spec`` for building ``inst``.

        Some users boot with an SSH key and some with cloud-init user data
        (base64): those are the largest notifications nova sends.
        """
        rng = self.rng
        key_name, key_data, user_data = "", None, None
        if rng.random() < 0.3:
            key_name = f"{rng.choice(_NAME_PARTS)}-key"
            key_data = ("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ" +
                        base64.b64encode(rng.randbytes(256)).decode("ascii") +
                        f" {inst.tenant.user_name}@{rng.choice(_NAME_PARTS)}")
        if rng.random() < 0.1:
            user_data = base64.b64encode(
                rng.randbytes(rng.randrange(300, 2400))).decode("ascii")
        flavor = inst.flavor
        image = inst.image
        tenant = inst.tenant
        properties = {key: value for key, value in image.meta.items()
                      if not key.startswith("instance_type_")}
        system_metadata = {f"image_{key}": value
                           for key, value in properties.items()}
        system_metadata.update(flavor.system_metadata())
        return {
            "block_device_mapping": [{
                "boot_index": 0,
                "delete_on_termination": True,
                "destination_type": "local",
                "device_name": None,
                "device_type": "disk",
                "disk_bus": None,
                "guest_format": None,
                "image_id": image.id,
                "instance_uuid": inst.uuid,
                "no_device": None,
                "snapshot_id": None,
                "source_type": "image",
                "volume_id": None,
                "volume_size": None,
            }],
            "image": {
                "checksum": image.checksum,
                "container_format": "ovf",
                "created_at": image.created_at,
                "deleted": False,
                "deleted_at": None,
                "disk_format": "vhd",
                "id": image.id,
                "is_public": image.owner is None,
                "min_disk": image.min_disk,
                "min_ram": image.min_ram,
                "name": image.name,
                "owner": image.owner,
                "properties": properties,
                "size": image.size,
                "status": "active",
                "updated_at": image.created_at,
            },
            "instance_properties": {
                "access_ip_v4": None,
                "access_ip_v6": None,
                "architecture": image.architecture,
                "auto_disk_config": image.meta.get("auto_disk_config") ==
                "True",
                "availability_zone": None,
                "cell_name": None,
                "cleaned": False,
                "config_drive": "",
                "created_at": inst.created_at,
                "default_ephemeral_device": None,
                "default_swap_device": None,
                "deleted": False,
                "deleted_at": None,
                "disable_terminate": False,
                "display_description": inst.display_name,
                "display_name": inst.display_name,
                "ephemeral_gb": flavor.ephemeral_gb,
                "ephemeral_key_uuid": None,
                "host": None,
                "hostname": inst.hostname,
                "id": inst.db_id,
                "image_ref": image.id,
                "info_cache": {
                    "created_at": inst.created_at,
                    "deleted": False,
                    "deleted_at": None,
                    "instance_uuid": inst.uuid,
                    "network_info": [],
                    "updated_at": None,
                },
                "instance_type_id": flavor.id,
                "kernel_id": "",
                "key_data": key_data,
                "key_name": key_name,
                "launch_index": 0,
                "launched_at": None,
                "launched_on": None,
                "locked": False,
                "locked_by": None,
                "memory_mb": flavor.memory_mb,
                "metadata": dict(inst.metadata),
                "name": f"instance-{inst.uuid}",
                "node": None,
                "os_type": image.os_type,
                "power_state": 0,
                "progress": 0,
                "project_id": tenant.project_id,
                "ramdisk_id": "",
                "reservation_id": inst.reservation_id,
                "root_device_name": None,
                "root_gb": flavor.root_gb,
                "scheduled_at": None,
                "security_groups": {"objects": [{
                    "created_at": inst.created_at,
                    "deleted": False,
                    "deleted_at": None,
                    "description": "default",
                    "id": inst.db_id % 50000,
                    "name": "default",
                    "project_id": tenant.project_id,
                    "updated_at": None,
                    "user_id": tenant.user_id,
                }]},
                "shutdown_terminate": False,
                "system_metadata": system_metadata,
                "task_state": "scheduling",
                "terminated_at": None,
                "updated_at": None,
                "user_data": user_data,
                "user_id": tenant.user_id,
                "uuid": inst.uuid,
                "vcpus": flavor.vcpus,
                "vm_mode": image.meta.get("vm_mode"),
                "vm_state": "building",
            },
            "instance_type": {
                "ephemeral_gb": flavor.ephemeral_gb,
                "extra_specs": {},
                "flavorid": flavor.flavorid,
                "id": flavor.id,
                "memory_mb": flavor.memory_mb,
                "name": flavor.name,
                "root_gb": flavor.root_gb,
                "rxtx_factor": float(flavor.rxtx_factor),
                "swap": flavor.swap,
                "vcpu_weight": flavor.vcpu_weight,
                "vcpus": flavor.vcpus,
            },
            "instance_uuids": [inst.uuid],
            "num_instances": 1,
            "security_group": ["default"],
        }

    # -- operations: each a generator of notifications -------------------

    def op_create(self):
        rng = self.rng
        inst = self._new_instance(rng.choice(self.tenants))
        inst.created_at = _fmt_s(self.now)
        self.instances[inst.uuid] = inst
        self.busy.add(inst.uuid)
        ctx = self.context(inst.tenant)
        scheduler = f"scheduler.{rng.choice(self.scheduler_hosts)}"
        yield self.update(ctx, inst, "scheduling")
        spec = orjson.dumps(self.request_spec(inst))
        yield self.notify(ctx, "scheduler.run_instance.start",
                          {"request_spec": orjson.loads(spec)}, scheduler)
        yield self.notify(ctx, "scheduler.run_instance.scheduled", {
            "instance_id": inst.uuid,
            "request_spec": orjson.loads(spec),
            "weighted_host": {"host": inst.host,
                              "weight": float(rng.randrange(20, 400))},
        }, scheduler)
        yield self.notify(ctx, "scheduler.run_instance.end",
                          {"request_spec": orjson.loads(spec)}, scheduler)
        image_name = inst.image.name
        yield self.notify(ctx, "compute.instance.create.start",
                          self.info(inst, image_name=image_name, message=""),
                          f"compute.{inst.host}")
        yield self.update(ctx, inst, None)
        yield self.update(ctx, inst, "networking")
        self._network(inst)
        yield self.update(ctx, inst, "block_device_mapping")
        yield self.update(ctx, inst, "spawning")
        inst.launched_at = _fmt_s(self.now)
        yield self.update(ctx, inst, None, "active")
        yield self.notify(ctx, "compute.instance.create.end", self.info(
            inst, fixed_ips=self.fixed_ips(inst), image_name=image_name,
            message="Success"), f"compute.{inst.host}")
        self.busy.discard(inst.uuid)

    def op_update(self, inst):
        rng = self.rng
        ctx = self.context(inst.tenant)
        choice = rng.random()
        if choice < 0.3:
            old = inst.display_name
            inst.display_name = (
                f"{rng.choice(_NAME_PARTS)}-{rng.choice(_NAME_PARTS)}-"
                f"{rng.randrange(1, 100):02d}")
            yield self.update(ctx, inst, None, old_display_name=old)
        elif choice < 0.6:
            inst.metadata = dict(inst.metadata)
            inst.metadata[rng.choice(("role", "owner", "env", "backup"))] = (
                rng.choice(_NAME_PARTS))
            yield self.update(ctx, inst, None)
        else:
            # Power state sync or a soft change: nothing visible moves.
            yield self.update(ctx, inst, None)
        self.busy.discard(inst.uuid)

    def op_exists(self, inst):
        yield self.exists(self.context(inst.tenant, admin=True), inst,
                          current=False)
        self.busy.discard(inst.uuid)

    def op_resize(self, inst):
        rng = self.rng
        ctx = self.context(inst.tenant)
        old_flavor = inst.flavor
        new_flavor = old_flavor
        while new_flavor is old_flavor:
            new_flavor = rng.choices(_FLAVOR_LIST, _FLAVOR_WEIGHTS)[0]
        source = inst.host
        dest = rng.choice(self.hosts) if rng.random() < 0.8 else source
        at_source = f"compute.{source}"
        at_dest = f"compute.{dest}"
        yield self.update(ctx, inst, "resize_prep", publisher=at_dest)
        yield self.exists(ctx, inst, current=True)
        yield self.notify(ctx, "compute.instance.resize.prep.start",
                          self.info(inst), at_dest)
        yield self.notify(ctx, "compute.instance.resize.prep.end", self.info(
            inst, new_instance_type=new_flavor.name,
            new_instance_type_id=new_flavor.id), at_dest)
        yield self.update(ctx, inst, "resize_migrating", publisher=at_source)
        yield self.notify(ctx, "compute.instance.resize.start", self.info(
            inst, fixed_ips=self.fixed_ips(inst)), at_source)
        yield self.update(ctx, inst, "resize_migrated", publisher=at_source)
        yield self.notify(ctx, "compute.instance.resize.end", self.info(
            inst, fixed_ips=self.fixed_ips(inst)), at_source)
        inst.host = dest
        inst.node = self.node(dest)
        inst.flavor = new_flavor
        yield self.update(ctx, inst, "resize_finish")
        yield self.notify(ctx, "compute.instance.finish_resize.start",
                          self.info(inst, fixed_ips=self.fixed_ips(inst)),
                          at_dest)
        inst.launched_at = _fmt_s(self.now)
        yield self.update(ctx, inst, None, "resized")
        yield self.notify(ctx, "compute.instance.finish_resize.end",
                          self.info(inst, fixed_ips=self.fixed_ips(inst)),
                          at_dest)
        self.busy.discard(inst.uuid)

    def op_confirm_resize(self, inst):
        ctx = self.context(inst.tenant)
        at = f"compute.{inst.host}"
        yield self.notify(ctx, "compute.instance.resize.confirm.start",
                          self.info(inst), at)
        yield self.update(ctx, inst, None, "active")
        yield self.notify(ctx, "compute.instance.resize.confirm.end",
                          self.info(inst, fixed_ips=self.fixed_ips(inst)), at)
        self.busy.discard(inst.uuid)

    def op_delete(self, inst):
        ctx = self.context(inst.tenant)
        at = f"compute.{inst.host}"
        yield self.update(ctx, inst, "deleting")
        yield self.notify(ctx, "compute.instance.delete.start",
                          self.info(inst), at)
        yield self.notify(ctx, "compute.instance.shutdown.start",
                          self.info(inst), at)
        yield self.notify(ctx, "compute.instance.shutdown.end",
                          self.info(inst), at)
        yield self.update(ctx, inst, None, "deleted")
        gone = _fmt_s(self.now)
        yield self.notify(ctx, "compute.instance.delete.end", self.info(
            inst, deleted_at=gone, terminated_at=gone), at)
        del self.instances[inst.uuid]
        self.busy.discard(inst.uuid)

    def new_operation(self):
        """Pick the next operation, weighted so the population stays level."""
        rng = self.rng
        active = self.idle_instances()
        resized = self.idle_instances(("resized",))
        population = len(self.instances)
        weights = (
            ("create", 0.10),
            ("delete", 0.10 * population / 120.0 if active else 0.0),
            ("resize", 0.03 if active else 0.0),
            ("confirm", 0.25 if resized else 0.0),
            ("update", 0.40 if active else 0.0),
            ("exists", 0.40 if active else 0.0),
        )
        kind = rng.choices([k for k, _ in weights],
                           [w for _, w in weights])[0]
        if kind == "create":
            return self.op_create()
        if kind == "confirm":
            inst = rng.choice(resized)
            kind = "confirm_resize"
        else:
            inst = rng.choice(active)
        # Taken now, not when the operation's first event is made, so that
        # no other operation starts on it meanwhile.
        self.busy.add(inst.uuid)
        return getattr(self, "op_" + kind)(inst)


def _utc_naive(moment):
    if moment.tzinfo is not None:
        moment = moment.astimezone(datetime.UTC).replace(tzinfo=None)
    return moment


def notifications(count: int | None = None, *, seed: int | None = None,
                  start: datetime.datetime | None = None
                  ) -> Iterator[dict]:
    """Yield realistic synthetic nova notifications (oslo v1 dicts).

    Instances are created (with the scheduler's events), renamed, resized
    and confirmed, audited (``compute.instance.exists``) and deleted; up to
    a handful of operations are in flight at once, so their events
    interleave. All events of one operation share ``_context_request_id``.
    ``timestamp`` strictly increases (by about a quarter second on average).

    :param count: how many to yield; None for an endless stream.
    :param seed: seed for the stream; the same seed and start give the same
        notifications. None picks a random one.
    :param start: :class:`datetime.datetime` of the first event (naive means
        UTC); default now.
    :returns: an iterator of notification dicts, each new (callers may
        change them).
    """
    if count is not None and count < 0:
        raise ValueError(f"count must be >= 0, not {count!r}")
    if start is None:
        start = datetime.datetime.now(datetime.UTC)
    rng = random.Random(seed)
    cloud = _Cloud(rng, _utc_naive(start))
    return _stream(cloud, count)


def _stream(cloud, count):
    rng = cloud.rng
    in_flight = []
    produced = 0
    while count is None or produced < count:
        if not in_flight or (len(in_flight) < 6 and rng.random() < 0.25):
            in_flight.append(cloud.new_operation())
        index = rng.randrange(len(in_flight))
        try:
            notification = next(in_flight[index])
        except StopIteration:
            del in_flight[index]
            continue
        produced += 1
        yield notification
