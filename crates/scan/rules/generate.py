# Generates crates/scan/rules/default.toml: rules with test cases made of random,
# well-formed fake secrets (never real ones). Run: python3 crates/scan/rules/generate.py
# Edit the rules here, not in the TOML, then run it again (the seed keeps cases stable).
import random, string, json
random.seed(20261123)
U=string.ascii_uppercase; L=string.ascii_lowercase; D=string.digits
AN=U+L+D; HEX='0123456789abcdef'; B32='ABCDEFGHIJKLMNOPQRSTUVWXYZ234567'
URLSAFE=AN+'_-'; B64=AN+'+/'
def r(chars,n): return ''.join(random.choice(chars) for _ in range(n))
def q(s): return json.dumps(s)

rules=[]
def rule(id, desc, sev, regex, keywords, pos, neg, group=1, entropy=None):
    rules.append(dict(id=id,desc=desc,sev=sev,regex=regex,keywords=keywords,pos=pos,neg=neg,group=group,entropy=entropy))

akid=lambda p='AKIA': p+r(U+'234567',16)
rule('aws-access-key-id','AWS access key ID','high', r'\b((?:AKIA|ASIA|ABIA|ACCA)[A-Z2-7]{16})\b',['akia','asia','abia','acca'],
  [f'aws_access_key_id = {akid()}', f'"AccessKeyId": "{akid("ASIA")}"'],
  ['aws_access_key_id = AKIAIOSFODNN7EXAMPLE', 'AKIA_NOT_A_KEY_AT_ALL'])
rule('aws-secret-access-key','AWS secret access key','critical', r'(?i)aws.{0,20}?(?:secret|key).{0,20}?[\x27"\s:=]+([A-Za-z0-9/+]{40})(?:[^A-Za-z0-9/+=]|$)',['aws'],
  [f'aws_secret_access_key = {r(B64,40)}', f'AWS_SECRET_KEY="{r(B64,40)}"'],
  ['aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY','aws_secret_access_key = ${AWS_SECRET_ACCESS_KEY}'])
rule('github-pat','GitHub personal access token (classic)','critical', r'\b(ghp_[0-9A-Za-z]{36})\b',['ghp_'],
  [f'token: ghp_{r(AN,36)}', f'GITHUB_TOKEN=ghp_{r(AN,36)}'], ['ghp_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx','ghp_short'])
rule('github-oauth-token','GitHub OAuth access token','critical', r'\b(gho_[0-9A-Za-z]{36})\b',['gho_'],[f'gho_{r(AN,36)}'],['gho_tooshort'])
rule('github-app-token','GitHub App installation or user token','critical', r'\b((?:ghu|ghs)_[0-9A-Za-z]{36})\b',['ghu_','ghs_'],[f'ghs_{r(AN,36)}',f'ghu_{r(AN,36)}'],['ghs_1234'])
rule('github-refresh-token','GitHub refresh token','high', r'\b(ghr_[0-9A-Za-z]{36,76})\b',['ghr_'],[f'ghr_{r(AN,76)}'],['ghr_abc'])
rule('github-fine-grained-pat','GitHub fine-grained personal access token','critical', r'\b(github_pat_[0-9A-Za-z_]{82})\b',['github_pat_'],[f'github_pat_{r(AN,22)}_{r(AN,59)}'],['github_pat_your-token-here'])
rule('gitlab-pat','GitLab personal access token','critical', r'\b(glpat-[0-9A-Za-z_-]{20})\b',['glpat-'],[f'glpat-{r(URLSAFE,20)}'],['glpat-xxxxxxxxxxxxxxxxxxxx'])
rule('gitlab-pipeline-trigger-token','GitLab pipeline trigger token','high', r'\b(glptt-[0-9a-f]{40})\b',['glptt-'],[f'glptt-{r(HEX,40)}'],['glptt-1234'])
rule('gitlab-runner-token','GitLab runner authentication token','high', r'\b(glrt-[0-9A-Za-z_-]{20})\b',['glrt-'],[f'glrt-{r(URLSAFE,20)}'],['glrt-short'])
rule('slack-bot-token','Slack bot token','high', r'\b(xoxb-[0-9]{10,13}-[0-9]{10,13}-[0-9A-Za-z]{24})\b',['xoxb-'],[f'xoxb-{r(D,12)}-{r(D,13)}-{r(AN,24)}'],['xoxb-your-bot-token'])
rule('slack-user-token','Slack user token','high', r'\b(xox[pe]-[0-9]{10,13}-[0-9]{10,13}-[0-9]{10,13}-[0-9a-f]{32})\b',['xoxp-','xoxe-'],[f'xoxp-{r(D,12)}-{r(D,12)}-{r(D,13)}-{r(HEX,32)}'],['xoxp-1-2-3-4'])
rule('slack-webhook-url','Slack incoming webhook URL','medium', r'(https://hooks\.slack\.com/(?:services|workflows)/T[0-9A-Z]{8,12}/B[0-9A-Z]{8,12}/[0-9A-Za-z]{24})',['hooks.slack.com'],[f'https://hooks.slack.com/services/T{r(U+D,9)}/B{r(U+D,10)}/{r(AN,24)}'],['https://hooks.slack.com/services/TXXXXXXXX/BXXXXXXXX/XXXXXXXXXXXXXXXXXXXXXXXX'])
rule('stripe-secret-key','Stripe live secret or restricted key','critical', r'\b((?:sk|rk)_live_[0-9A-Za-z]{24,99})\b',['sk_live_','rk_live_'],[f'sk_live_{r(AN,24)}',f'rk_live_{r(AN,34)}'],['sk_live_xxxxxxxxxxxxxxxxxxxxxxxx'])
rule('stripe-test-key','Stripe test secret key','low', r'\b(sk_test_[0-9A-Za-z]{24,99})\b',['sk_test_'],[f'sk_test_{r(AN,24)}'],['sk_test_short'])
rule('google-api-key','Google API key','high', r'\b(AIza[0-9A-Za-z_-]{35})(?:[^0-9A-Za-z_-]|$)',['aiza'],[f'AIza{r(URLSAFE,35)}'],['AIzaSyEXAMPLE'])
rule('gcp-service-account-key','Google Cloud service account key (private_key_id)','critical', r'"private_key_id"\s*:\s*"([0-9a-f]{40})"',['private_key_id'],[f'"private_key_id": "{r(HEX,40)}"'],['"private_key_id": "your-key-id"'])
rule('azure-storage-account-key','Azure storage account key','critical', r'(?i)AccountKey=([A-Za-z0-9+/]{86}==)',['accountkey='],[f'DefaultEndpointsProtocol=https;AccountName=acme;AccountKey={r(B64,86)}==;EndpointSuffix=core.windows.net'],['AccountKey=<your-account-key>'])
rule('azure-ad-client-secret','Azure AD (Entra) client secret','high', r'(?:^|[^0-9A-Za-z_~.-])([0-9A-Za-z_~.]{3}[0-9]Q~[0-9A-Za-z_~.-]{31,34})(?:[^0-9A-Za-z_~.-]|$)',['q~'],[f'client_secret = {r(AN,3)}{r(D,1)}Q~{r(AN,34)}'],['Q~ short'])
rule('twilio-api-key','Twilio API key SID','high', r'\b(SK[0-9a-f]{32})\b',['sk'],[f'TWILIO_API_KEY=SK{r(HEX,32)}'],['SKIP_TESTS=1'])
rule('twilio-auth-token','Twilio auth token','high', r'(?i)twilio.{0,20}?(?:token|secret).{0,10}?[\x27"\s:=]+([0-9a-f]{32})\b',['twilio'],[f'TWILIO_AUTH_TOKEN={r(HEX,32)}'],['TWILIO_AUTH_TOKEN=${TWILIO_TOKEN}'])
rule('sendgrid-api-key','SendGrid API key','high', r'\b(SG\.[0-9A-Za-z_-]{22}\.[0-9A-Za-z_-]{43})\b',['sg.'],[f'SG.{r(URLSAFE,22)}.{r(URLSAFE,43)}'],['SG.example'])
rule('npm-access-token','npm access token','high', r'\b(npm_[0-9A-Za-z]{36})\b',['npm_'],[f'//registry.npmjs.org/:_authToken=npm_{r(AN,36)}'],['npm_config_cache=/tmp'])
rule('pypi-upload-token','PyPI upload token','high', r'\b(pypi-AgEIcHlwaS5vcmc[0-9A-Za-z_-]{50,})',['pypi-ageichlwas5vcmc'],[f'password = pypi-AgEIcHlwaS5vcmc{r(URLSAFE,60)}'],['pypi-AgEIcHlwaS5vcmc'])
rule('private-key-pem','Private key (PEM)','critical', r'(-----BEGIN (?:RSA |EC |DSA |ENCRYPTED )?PRIVATE KEY-----[\s\S]{64,}?-----END (?:RSA |EC |DSA |ENCRYPTED )?PRIVATE KEY-----)',['private key-----'],
  ['-----BEGIN RSA PRIVATE KEY-----\n'+'\n'.join(r(B64,64) for _ in range(4))+'\n-----END RSA PRIVATE KEY-----'],['-----BEGIN RSA PRIVATE KEY-----\n...\n-----END RSA PRIVATE KEY-----'])
rule('openssh-private-key','OpenSSH private key','critical', r'(-----BEGIN OPENSSH PRIVATE KEY-----[\s\S]{64,}?-----END OPENSSH PRIVATE KEY-----)',['openssh private key'],
  ['-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA'+r(B64,40)+'\n'+r(B64,70)+'\n-----END OPENSSH PRIVATE KEY-----'],['-----BEGIN OPENSSH PRIVATE KEY-----\n<redacted>\n-----END OPENSSH PRIVATE KEY-----'])
rule('pgp-private-key','PGP private key block','critical', r'(-----BEGIN PGP PRIVATE KEY BLOCK-----[\s\S]{64,}?-----END PGP PRIVATE KEY BLOCK-----)',['pgp private key block'],
  ['-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nlQOYBF'+r(B64,60)+'\n'+r(B64,64)+'\n-----END PGP PRIVATE KEY BLOCK-----'],['-----BEGIN PGP PRIVATE KEY BLOCK-----\n-----END PGP PRIVATE KEY BLOCK-----'])
def jwt(): return 'eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ'+r(URLSAFE,40)+'.'+r(URLSAFE,43)
rule('jwt','JSON Web Token','medium', r'\b(eyJ[0-9A-Za-z_-]{10,}\.eyJ[0-9A-Za-z_-]{10,}\.[0-9A-Za-z_-]{10,})\b',['eyj'],[f'Authorization: Bearer {jwt()}'],['eyJhbGciOiJIUzI1NiJ9.e30'])
rule('database-url-password','Database URL with a password','high', r'\b(?:postgres(?:ql)?|mysql|mariadb|mongodb(?:\+srv)?|rediss?|amqps?|mssql|sqlserver)://[^\s:/@\x27"]+:([^\s:/@\x27"]{4,})@[^\s/\x27"]+',['postgres','mysql','mariadb','mongodb','redis','amqp','mssql','sqlserver'],
  [f'DATABASE_URL=postgres://app:{r(AN,20)}@db.internal:5432/app', f'mongodb+srv://svc:{r(AN,16)}@cluster0.example.net/prod'],
  ['postgres://user:password@localhost/db','postgres://app:${DB_PASSWORD}@db/app','mysql://root:changeme@localhost/test'])
rule('url-credentials','Credentials in an http(s) URL','medium', r'\bhttps?://[^\s:/@\x27"]{1,64}:([^\s:/@\x27"]{8,})@[^\s/\x27"]+',['://'],
  [f'https://deploy:{r(AN,24)}@git.internal.example/repo.git'],['https://user:password@example.com','https://user:${TOKEN}@example.com'], entropy=3.0)
rule('kubernetes-bootstrap-token','Kubernetes bootstrap token','high', r'(?i)(?:bootstrap|token|join).{0,40}?\b([a-z0-9]{6}\.[a-z0-9]{16})\b',['token','bootstrap'],
  [f'kubeadm join 10.0.0.1:6443 --token {r(L+D,6)}.{r(L+D,16)}'],['--token abcdef.0123456789abcdef'])
rule('heroku-api-key','Heroku API key','high', r'(?i)heroku.{0,30}?\b([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\b',['heroku'],[f'HEROKU_API_KEY={r(HEX,8)}-{r(HEX,4)}-{r(HEX,4)}-{r(HEX,4)}-{r(HEX,12)}'],['HEROKU_API_KEY=xxxxxxxx'])
rule('mailgun-api-key','Mailgun API key','high', r'\b(key-[0-9a-f]{32})\b',['key-'],[f'MAILGUN_KEY=key-{r(HEX,32)}'],['key-value'])
rule('mailchimp-api-key','Mailchimp API key','high', r'\b([0-9a-f]{32}-us[0-9]{1,2})\b',['-us'],[f'{r(HEX,32)}-us14'],['aaaa-us1'])
rule('shopify-token','Shopify access token','high', r'\b(shp(?:at|ca|pa|ss)_[0-9a-fA-F]{32})\b',['shpat_','shpca_','shppa_','shpss_'],[f'shpat_{r(HEX,32)}'],['shpat_example'])
rule('digitalocean-token','DigitalOcean token','high', r'\b(do[opr]_v1_[0-9a-f]{64})\b',['dop_v1_','doo_v1_','dor_v1_'],[f'dop_v1_{r(HEX,64)}'],['dop_v1_'])
rule('vault-service-token','HashiCorp Vault service or batch token','critical', r'\b(hv[sb]\.[0-9A-Za-z_-]{90,})',['hvs.','hvb.'],[f'VAULT_TOKEN=hvs.{r(URLSAFE,95)}'],['hvs.short'])
rule('terraform-cloud-token','Terraform Cloud / Enterprise token','high', r'\b([0-9A-Za-z]{14}\.atlasv1\.[0-9A-Za-z_=-]{60,70})\b',['atlasv1'],[f'{r(AN,14)}.atlasv1.{r(AN,67)}'],['x.atlasv1.y'])
rule('openai-api-key','OpenAI API key','high', r'\b(sk-(?:proj-|svcacct-|admin-)?[0-9A-Za-z_-]{20,}T3BlbkFJ[0-9A-Za-z_-]{20,})\b',['t3blbkfj'],[f'sk-proj-{r(AN,40)}T3BlbkFJ{r(AN,40)}'],['sk-your-openai-key'])
rule('anthropic-api-key','Anthropic API key','high', r'\b(sk-ant-(?:api03|admin01)-[0-9A-Za-z_-]{90,}AA)(?:[^0-9A-Za-z_-]|$)',['sk-ant-'],[f'sk-ant-api03-{r(URLSAFE,93)}AA'],['sk-ant-api03-xxxx'])
rule('discord-webhook-url','Discord webhook URL','medium', r'(https://(?:ptb\.|canary\.)?discord(?:app)?\.com/api/webhooks/[0-9]{17,20}/[0-9A-Za-z_-]{60,68})',['discord'],[f'https://discord.com/api/webhooks/{r(D,18)}/{r(URLSAFE,68)}'],['https://discord.com/api/webhooks/123/abc'])
rule('telegram-bot-token','Telegram bot token','high', r'\b([0-9]{8,10}:AA[0-9A-Za-z_-]{33})\b',[':aa'],[f'TELEGRAM_TOKEN={r(D,10)}:AA{r(URLSAFE,33)}'],['1234:AAshort'])
rule('datadog-api-key','Datadog API key','high', r'(?i)(?:datadog|dd)_?api_?key.{0,10}?[\x27"\s:=]+([0-9a-f]{32})\b',['datadog','dd_api','ddapi','dd-api'],[f'DD_API_KEY={r(HEX,32)}'],['DD_API_KEY=<your-key>'])
rule('newrelic-user-key','New Relic user API key','high', r'\b(NRAK-[0-9A-Z]{27})\b',['nrak-'],[f'NRAK-{r(U+D,27)}'],['NRAK-EXAMPLE'])
rule('docker-hub-pat','Docker Hub personal access token','high', r'\b(dckr_pat_[0-9A-Za-z_-]{27})\b',['dckr_pat_'],[f'dckr_pat_{r(URLSAFE,27)}'],['dckr_pat_'])
rule('age-secret-key','age secret key','critical', r'\b(AGE-SECRET-KEY-1[QPZRY9X8GF2TVDW0S3JN54KHCE6MUA7L]{58})\b',['age-secret-key-1'],['AGE-SECRET-KEY-1'+r('QPZRY9X8GF2TVDW0S3JN54KHCE6MUA7L',58)],['AGE-SECRET-KEY-1XXXX'])
rule('linear-api-key','Linear API key','medium', r'\b(lin_api_[0-9A-Za-z]{40})\b',['lin_api_'],[f'lin_api_{r(AN,40)}'],['lin_api_example'])
rule('grafana-service-account-token','Grafana service account token','high', r'\b(glsa_[0-9A-Za-z]{32}_[0-9A-Fa-f]{8})\b',['glsa_'],[f'glsa_{r(AN,32)}_{r(HEX,8)}'],['glsa_example'])
rule('alibaba-access-key-id','Alibaba Cloud AccessKey ID','high', r'\b(LTAI[0-9A-Za-z]{20})\b',['ltai'],[f'LTAI{r(AN,20)}'],['LTAIEXAMPLE'])
rule('huggingface-token','Hugging Face access token','high', r'\b(hf_[0-9A-Za-z]{34})\b',['hf_'],[f'HF_TOKEN=hf_{r(AN,34)}'],['hf_hub_download'])
rule('databricks-token','Databricks personal access token','high', r'\b(dapi[0-9a-f]{32}(?:-[0-9])?)\b',['dapi'],[f'DATABRICKS_TOKEN=dapi{r(HEX,32)}'],['dapi_example'])
rule('postman-api-key','Postman API key','medium', r'\b(PMAK-[0-9a-f]{24}-[0-9a-f]{34})\b',['pmak-'],[f'PMAK-{r(HEX,24)}-{r(HEX,34)}'],['PMAK-example'])
rule('sentry-auth-token','Sentry auth token','medium', r'\b(sntrys_eyJ[0-9A-Za-z+/=_-]{80,})',['sntrys_'],[f'sntrys_eyJ{r(AN,120)}'],['sntrys_'])
rule('generic-secret-assignment','A secret assigned to a telling name (password, api_key, token, …), judged by entropy','medium',
  r'(?i)(?:^|[^0-9a-z])(?:password|passwd|pwd|secret|api[_-]?key|apikey|access[_-]?key|access[_-]?token|auth[_-]?token|client[_-]?secret|private[_-]?token|secret[_-]?key)["\x27]?\s{0,3}(?::=|=>|=|:)\s{0,3}["\x27]?([^\s"\x27`;,<>(){}\[\]]{10,128})',
  ['password','passwd','pwd','secret','api_key','api-key','apikey','access_key','access-key','token'],
  [f'password = "{r(AN+"!#%",20)}"', f'api_key: {r(AN,32)}', f'CLIENT_SECRET={r(AN,28)}'],
  ['password = "your-password-here"','api_key: ${API_KEY}','secret = os.environ["SECRET"]','password = "xxxxxxxxxxxx"','token = get_token_from_vault()','password: <password>'], entropy=3.5)

out=['# keywarden scan rules. Each rule: an id, a description, a severity (low, medium,',
     '# high, critical), a regex whose capture group `group` (default 1) is the secret,',
     '# keywords of which at least one must occur (case-insensitively) before the regex runs,',
     '# an optional minimum Shannon entropy (bits per character) of the secret, and test',
     '# cases: every `positive` must be found by this rule, no `negative` may be.',
     '# Extend with `keywarden scan --rules FILE` (same format; a rule with an existing id',
     '# replaces it). Fake secrets below are random and match only the format.','']
for x in rules:
    out.append('[[rule]]')
    out.append(f'id = {q(x["id"])}')
    out.append(f'description = {q(x["desc"])}')
    out.append(f'severity = {q(x["sev"])}')
    out.append("regex = '''" + x["regex"] + "'''")
    out.append('keywords = [' + ', '.join(q(k) for k in x['keywords']) + ']')
    if x['entropy']: out.append(f'entropy = {x["entropy"]}')
    out.append('positive = [' + ', '.join(q(p) for p in x['pos']) + ']')
    out.append('negative = [' + ', '.join(q(n) for n in x['neg']) + ']')
    out.append('')
open(__import__('os').path.join(__import__('os').path.dirname(__file__), 'default.toml'),'w').write('\n'.join(out))
print(len(rules))
