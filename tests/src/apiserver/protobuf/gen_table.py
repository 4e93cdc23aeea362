#!/usr/bin/env python3
"""Regenerates table.rs: the protobuf field tables of the built-in kinds the test API server
decodes, read from the k8s-pb crate sources (prost bindings of Kubernetes generated.proto).

Usage: gen_table.py <k8s-pb>/src table.rs
"""
import re, os, json, sys

# The kinds whose protobuf bodies are decoded (the built-in kinds the server serves).
ROOTS = ["api.core.v1.Namespace", "api.core.v1.ConfigMap", "api.core.v1.Secret", "api.core.v1.Service",
         "api.apps.v1.Deployment", "api.core.v1.Pod", "api.discovery.v1.EndpointSlice", "api.coordination.v1.Lease",
         "api.core.v1.Event", "api.events.v1.Event", "api.core.v1.Endpoints", "api.core.v1.Node", "api.apps.v1.ReplicaSet"]
import tempfile
TABLE_JSON = tempfile.mktemp(suffix=".json")
root = sys.argv[1]
msgs = {}  # qualified -> list of fields
for dp, dn, fn in os.walk(root):
    for f in fn:
        if not f.endswith('.rs'): continue
        path = os.path.join(dp, f)
        rel = os.path.relpath(dp, root).replace(os.sep, '.')
        if rel == '.': continue
        src = open(path).read().split('\n')
        cur = None
        i = 0
        while i < len(src):
            line = src[i]
            m = re.match(r'\s*pub struct (\w+) \{', line)
            if m:
                cur = rel + '.' + m.group(1); msgs[cur] = []
            m = re.match(r'\s*#\[prost\((.*)\)\]', line)
            if m and cur:
                attr = m.group(1)
                # field decl on a following line
                j = i + 1
                while not src[j].strip().startswith('pub '): j += 1
                decl = src[j].strip()
                k = j
                while not decl.endswith(',') or decl.count('<') != decl.count('>'):
                    k += 1; decl += ' ' + src[k].strip()
                fm = re.match(r'pub (?:r#)?(\w+): *(.*),$', decl)
                if not fm:
                    print("BAD", path, repr(decl), file=sys.stderr); i = j; i += 1; continue
                name, ty = fm.group(1), fm.group(2)
                tag = int(re.search(r'tag = "(\d+)"', attr).group(1))
                kind = attr.split(',')[0].strip()
                label = 'repeated' if 'repeated' in attr else 'optional'
                target = None
                if kind == 'message':
                    t = [x for x in re.findall(r'[\w:]+', ty.replace(' ', '')) if x.strip(':')][-1]
                    segs = t.split('::')
                    # resolve relative path
                    base = rel.split('.')
                    for s in segs[:-1]:
                        if s == 'super': base = base[:-1]
                        else: base = base + [s]
                    target = '.'.join(base + [segs[-1]])
                    if len(segs) == 1: target = rel + '.' + segs[-1]
                if kind.startswith('btree_map'):
                    mv = re.search(r'btree_map = "string, (\w+)"', attr).group(1)
                    kind = 'map_' + mv
                    if mv == 'message':
                        mm = re.findall(r'BTreeMap<[^,]+,([\w:]+),?>', ty.replace(' ', ''))
                        if not mm: print('BADMAP', repr(ty), file=sys.stderr); i = j + 1; continue
                        t = mm[0]
                        segs = t.split('::'); base = rel.split('.')
                        for s in segs[:-1]:
                            if s == 'super': base = base[:-1]
                            else: base = base + [s]
                        target = '.'.join(base + [segs[-1]]) if len(segs) > 1 else rel + '.' + segs[-1]
                if 'enumeration' in attr: kind = 'int32'
                msgs[cur].append(dict(tag=tag, kind=kind, label=label, name=name, target=target))
                i = j
            i += 1
roots = ROOTS
need = set(); todo = list(roots)
while todo:
    m = todo.pop()
    if m in need: continue
    if m not in msgs: print('MISSING', m, file=sys.stderr); continue
    need.add(m)
    for f in msgs[m]:
        if f['target']: todo.append(f['target'])
out = {m: msgs[m] for m in sorted(need)}
json.dump(out, open('TABLE_JSON','w'), indent=0)
print(len(out), sum(len(v) for v in out.values()))
kinds = set(f['kind'] for v in out.values() for f in v); print(kinds)

t = json.load(open('TABLE_JSON'))
kinds = {'string': 'Str', 'int32': 'I32', 'int64': 'I64', 'bool': 'Bool', 'bytes = "vec"': 'Bytes',
         'message': 'Msg', 'map_string': 'MapStr', 'map_bytes': 'MapBytes', 'map_message': 'MapMsg'}
out = []
out.append('// Generated from the Kubernetes protobuf definitions (as the k8s-pb crate carries them)')
out.append('// by gen_table.py in this folder; do not edit. Field numbers are the wire format of')
out.append('// k8s.io/api and k8s.io/apimachinery `generated.proto`.')
out.append('')
out.append('use super::decode::{Field, Kind::*};')
out.append('')
out.append('#[rustfmt::skip]')
out.append('pub static MESSAGES: &[(&str, &[Field])] = &[')
for m in sorted(t):
    out.append(f'    ("{m}", &[')
    for f in sorted(t[m], key=lambda f: f['tag']):
        rep = 'true' if f['label'] == 'repeated' else 'false'
        tgt = f['target'] or ''
        out.append(f'        Field {{ tag: {f["tag"]}, kind: {kinds[f["kind"]]}, repeated: {rep}, name: "{f["name"]}", target: "{tgt}" }},')
    out.append('    ]),')
out.append('];')
open(sys.argv[2], 'w').write('\n'.join(out) + '\n')
