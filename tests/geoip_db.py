"""Real MaxMind DB files for the tests, written with mmdb-writer (pure Python).

The networks are documentation ranges (RFC 5737, RFC 3849) that the tests configure
only inside their own namespaces. Names come in English and Simplified Chinese, as
GeoLite2 ships them; one city lacks a zh-CN name (lpd must fall back to English) and
one network has a country but no subdivision or city (Unknown).
"""
from mmdb_writer import MMDBWriter
from netaddr import IPSet

# network -> (country en, zh-CN), (province en, zh-CN) or None, (city en, zh-CN or None) or None
CITY = {
    "198.51.100.0/24": (("United States", "美国"), ("California", "加利福尼亚州"),
                        ("Mountain View", "芒廷维尤")),
    "203.0.113.0/24": (("China", "中国"), ("Jiangsu", "江苏省"), ("Nanjing", "南京市")),
    "192.0.2.0/24": (("Japan", "日本"), ("Tokyo", "东京都"), ("Chiyoda", None)),
    "2001:db8:100::/48": (("Germany", "德国"), ("Hesse", "黑森"), ("Frankfurt am Main", "法兰克福")),
    "2001:db8:200::/48": (("France", "法国"), None, None),
}
ISP = {
    "198.51.100.0/24": "Example Transit",
    "203.0.113.0/24": "China Telecom",
    "2001:db8:100::/48": "Deutsche Beispiel",
}
ASN = {
    "198.51.100.0/24": (64500, "EXAMPLE-AS"),
    "2001:db8:100::/48": (64501, "BEISPIEL-AS"),
}


def _names(en, zh):
    return {"en": en, **({"zh-CN": zh} if zh else {})}


def write_city(path, database_type="GeoLite2-City", city=CITY):
    w = MMDBWriter(ip_version=6, database_type=database_type, languages=["en", "zh-CN"],
                   description="lpd test City database", ipv4_compatible=True)
    for net, (country, province, town) in city.items():
        record = {"country": {"names": _names(*country)}}
        if province:
            record["subdivisions"] = [{"names": _names(*province)}]
        if town:
            record["city"] = {"names": _names(*town)}
        w.insert_network(IPSet([net]), record)
    w.to_db_file(str(path))
    return path


def write_isp(path):
    w = MMDBWriter(ip_version=6, database_type="GeoIP2-ISP", description="lpd test ISP database",
                   ipv4_compatible=True)
    for net, isp in ISP.items():
        w.insert_network(IPSet([net]), {"isp": isp, "organization": isp})
    w.to_db_file(str(path))
    return path


def write_asn(path):
    w = MMDBWriter(ip_version=6, database_type="GeoLite2-ASN", description="lpd test ASN database",
                   ipv4_compatible=True)
    for net, (number, org) in ASN.items():
        w.insert_network(IPSet([net]), {"autonomous_system_number": number,
                                        "autonomous_system_organization": org})
    w.to_db_file(str(path))
    return path
